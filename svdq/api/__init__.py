"""The service's domain types and tensor wire format, shared by the server (``svdq_server``)
and the clients (``svdq_client``): profiles, sequence and server info, attention results,
and their ``to_pb``/``from_pb`` conversions (:mod:`svdq.api.types`); tensors to and from
``svdq.v1.Tensor`` messages (:mod:`svdq.api.wire`). The rest of ``svdq`` does not import it."""
