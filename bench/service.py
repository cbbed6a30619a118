"""Service benchmark on loopback: upload throughput, Attend latency and throughput, stored bytes,
for SVDq-compressed keys and, side by side in the same run against the same server process,
compression off (fp16 passthrough profile).

    python bench/service.py                       # starts its own server on 127.0.0.1 (CPU)
    python bench/service.py --tokens 4096 --layers 4 --device auto
    python bench/service.py --address host:port   # an already running server (no auth)
    python bench/service.py --part stores         # memory store vs Redis store, 1 and 3 replicas
    python bench/service.py --part attend --torch-threads 1   # Attend RPC vs in-process, 32 clients

Keys are synthetic post-RoPE keys with a nearly low-rank pre-RoPE form (shape of
SmolLM2-135M: 3 KV heads x 64, 9 query heads). Stored bytes do not depend on the values
(the codec spends a fixed bit budget), but reconstruction quality would: quality is
measured on a real model by bench/quality.py, not here. Latencies are client-observed
wall times of one call (gRPC round trip included); p50/p99 over the iterations.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from svdq_client import KVCacheClient, Profile, Sparsity

from svdq import CodecConfig, RopeConfig, apply_rope, compress
from svdq.values import compress_values

KV_HEADS, HEAD_DIM, Q_HEADS = 3, 64, 9
ROPE = RopeConfig(theta=100000.0)


def synthetic_cache(layers: int, tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 post-RoPE keys and values [layers, tokens, KV_HEADS, HEAD_DIM]."""
    generator = torch.Generator().manual_seed(seed)
    channels = KV_HEADS * HEAD_DIM
    rank = 16
    latent = torch.randn(layers, tokens, rank, generator=generator) * torch.logspace(1, -1, rank)
    pre = latent @ torch.randn(layers, rank, channels, generator=generator) / rank**0.5
    pre = (pre + 0.05 * torch.randn(layers, tokens, channels, generator=generator)).reshape(
        layers, tokens, KV_HEADS, HEAD_DIM)
    positions = torch.arange(tokens)
    keys = torch.stack([apply_rope(pre[layer], positions, ROPE) for layer in range(layers)]).half()
    values = torch.randn(layers, tokens, KV_HEADS, HEAD_DIM, generator=generator).half()
    return keys, values


def start_server(device: str, torch_threads: int, *extra_args: str,
                 packages: Path | None = None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "svdq_server.cli", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
         "--device", device, "--store-bytes", "8GiB", "--log-level", "WARNING", "--torch-threads", str(torch_threads),
         "--drain-seconds", "0", "--grace-seconds", "0", *extra_args],
        # Started in ``packages`` (the current folder comes first on the path, before the
        # editable install), the server imports the code there.
        env={**os.environ}, cwd=packages, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    with KVCacheClient(address, retries=0, timeout=2) as probe_client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"server exited: {process.stderr.read().decode()[-3000:]}")
            try:
                probe_client.server_info()
                return process, address
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.3)
    process.kill()
    raise SystemExit("server did not start within 120 s")


def register_unary(client: KVCacheClient, profile: Profile) -> None:
    """Register a small profile (replacing one of that name) with the unary RegisterProfile,
    which every server version has: a ``--baseline`` server from before the profile stream
    answers the clients' RegisterProfileStream with UNIMPLEMENTED."""
    from svdq_proto.svdq.v1 import kvcache_pb2 as pb
    from svdq_proto.svdq.v1 import kvcache_pb2_grpc as pb_grpc

    pb_grpc.KVCacheStub(client._channels[0]).RegisterProfile(
        pb.RegisterProfileRequest(profile=profile.to_pb(), replace=True), timeout=60)


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def codec_seconds(profile: Profile, keys: torch.Tensor, values: torch.Tensor) -> float:
    """Seconds the codec alone takes, in this process, for what an upload of ``keys`` and
    ``values`` [layers, tokens, kv_heads, head_dim] under ``profile`` compresses: every layer's
    keys (post-RoPE, with positions) and values, as the server's engine calls it."""
    positions = torch.arange(keys.shape[1])
    started = time.perf_counter()
    for layer in range(keys.shape[0]):
        compress(keys[layer], profile.codec, positions=positions, rope=profile.rope, key_space="post_rope")
        compress_values(values[layer], profile.value_config)
    return time.perf_counter() - started


def minor_faults(pid: int | None) -> int | None:
    """Minor page faults of process ``pid`` so far (Linux ``/proc``; None elsewhere or without a pid)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7]) if pid else None
    except OSError:
        return None


def bench_profile(clients: dict[str, KVCacheClient], profile: Profile, keys, values, batches, iterations, sparsity,
                  repeats, pids: dict[str, int] | None = None):
    """Upload timing through each server of ``clients`` (label -> client: the working tree's
    first, then e.g. ``--baseline``) and the codec's own time for the same data, all in turns
    (every repeat times the codec and one upload per server), medians of ``repeats``; the
    server's minor page faults per upload and CPU seconds (all its threads) over all uploads
    against the codec's (``pids``: label -> server process, where this bench started it);
    stored bytes; then Attend latencies per batch size through the first server (none when
    ``batches`` is empty). Returns one row per server."""
    pids = pids or {}
    watched = {label: psutil.Process(pid) for label, pid in pids.items()}
    upload_seconds: dict[str, list[float]] = {label: [] for label in clients}
    upload_faults: dict[str, list[int]] = {label: [] for label in clients}
    server_cpu = dict.fromkeys(clients, 0.0)
    codec_times = []
    codec_cpu = 0.0
    sequences, infos = {}, {}
    for repeat in range(repeats):
        started = time.process_time()
        codec_times.append(codec_seconds(profile, keys, values))
        codec_cpu += time.process_time() - started
        for label, client in clients.items():
            sequences[label] = f"bench-{profile.name}-{repeat}-{uuid.uuid4().hex[:6]}"
            faults = minor_faults(pids.get(label))
            cpu = sum(watched[label].cpu_times()[:2]) if label in watched else 0.0
            started = time.perf_counter()
            infos[label] = client.upload(sequences[label], profile.name, keys, values,
                                         positions=torch.arange(keys.shape[1]), key_space="post_rope")
            upload_seconds[label].append(time.perf_counter() - started)
            if faults is not None:
                upload_faults[label].append(minor_faults(pids[label]) - faults)
            if label in watched:
                server_cpu[label] += sum(watched[label].cpu_times()[:2]) - cpu
            print(f"# {profile.name} upload {repeat} [{label}]: {upload_seconds[label][-1]:.2f} s, codec alone "
                  f"{codec_times[-1]:.2f} s", file=sys.stderr, flush=True)
            if repeat < repeats - 1:
                client.delete(sequences[label])
    key_mb = keys.numel() * 2 / 1e6
    codec = statistics.median(codec_times)
    rows = {}
    for label, seconds in upload_seconds.items():
        info = infos[label]
        # each round's upload over the codec time taken just before it: load that comes and goes
        # (the machine is shared) hits both sides of one ratio alike
        ratios = [upload / alone for upload, alone in zip(seconds, codec_times, strict=True)]
        rows[label] = {"upload_mb_s": key_mb / statistics.median(seconds), "key_bytes": info.key_bytes,
                       "codec_mb_s": key_mb / codec, "upload_over_codec": statistics.median(ratios),
                       "faults": statistics.median(upload_faults[label]) if upload_faults[label] else None,
                       "cpu_over_codec": server_cpu[label] / codec_cpu if label in watched else None,
                       "value_bytes": info.value_bytes, "fp16_key_bytes": info.fp16_key_bytes, "attend": {}}
    first = next(iter(clients))
    client, sequence, attend = clients[first], sequences[first], rows[first]["attend"]
    generator = torch.Generator().manual_seed(1)
    layers = keys.shape[0]
    for batch in batches:
        entries = [(sequence, index % layers) for index in range(batch)]
        queries = torch.randn(batch, Q_HEADS, HEAD_DIM, generator=generator).half()
        client.attend(queries, entries, sparsity=sparsity)  # warm-up
        samples = []
        for _ in range(iterations[batch]):
            started = time.perf_counter()
            client.attend(queries, entries, sparsity=sparsity)
            samples.append(time.perf_counter() - started)
        p50 = statistics.median(samples)
        attend[batch] = (p50, percentile(samples, 0.99), batch / p50)
    for label, client in clients.items():
        client.delete(sequences[label])
    return rows


# -- store backends: memory vs Redis, one and several replicas ------------------------------------

def redis_process(folder: Path):
    """A redis-server with deploy/redis/redis.conf (AOF, appendfsync always): the tests' helper."""
    spec = importlib.util.spec_from_file_location("redis_process", Path(__file__).parents[1] / "tests" / "redis_process.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if module.REDIS_SERVER is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    return module.RedisProcess(folder).start()


def attend_throughput(addresses: list[str], sequences: list[str], layers: int, batch: int, seconds: float,
                      clients_per_replica: int) -> float:
    """Attend calls per second of ``clients_per_replica`` client threads per replica, each
    calling its replica back to back with batches over its own warm sequence."""
    queries = torch.randn(batch, Q_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(3)).half()
    counts = []
    start = threading.Barrier(len(addresses) * clients_per_replica + 1)
    stop = threading.Event()

    def worker(address, sequence):
        entries = [(sequence, index % layers) for index in range(batch)]
        done = 0
        with KVCacheClient(address, timeout=600) as client:
            client.attend(queries, entries)  # warm
            start.wait()
            while not stop.is_set():
                client.attend(queries, entries)
                done += 1
        counts.append(done)

    threads = [threading.Thread(target=worker, args=(address, sequences[index * clients_per_replica + client]))
               for index, address in enumerate(addresses) for client in range(clients_per_replica)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - began)


@dataclass(frozen=True)
class Throughput:
    """One throughput run: the calls, and what the replicas and Redis spent on them."""

    calls_per_second: float
    #: CPU seconds (user + system) of the replica processes per wall second
    cores: float
    cpu_ms_per_call: float
    #: share of the machine's CPU time that nobody used during the run
    idle: float
    commands_per_call: float
    transactions: int
    lru_writes: int


def measured_throughput(addresses: list[str], processes: list[psutil.Process], redis, sequences: list[str], args,
                        batch: int) -> Throughput:
    """:func:`attend_throughput` with the replicas' CPU time, the machine's idle time and the
    Redis commands of the run: whether the replicas were short of CPU or waited on the store."""
    redis.config_resetstat()
    cpu_before = [sum(process.cpu_times()[:2]) for process in processes]
    machine_before = psutil.cpu_times()
    began = time.perf_counter()
    rate = attend_throughput(addresses, sequences, args.layers, batch, args.seconds, 1)
    wall = time.perf_counter() - began
    machine_after = psutil.cpu_times()
    cpu = sum(sum(process.cpu_times()[:2]) - before for process, before in zip(processes, cpu_before, strict=True))
    commands = {name.removeprefix("cmdstat_"): stats["calls"] for name, stats in redis.info("commandstats").items()}
    commands.pop("config|resetstat", None)
    calls = rate * args.seconds
    elapsed = sum(machine_after) - sum(machine_before)
    return Throughput(rate, cpu / wall, 1e3 * cpu / calls, (machine_after.idle - machine_before.idle) / elapsed,
                      sum(commands.values()) / calls, commands.get("exec", 0), commands.get("zadd", 0))


def bench_stores(args) -> None:
    """Rows side by side: a memory-store server, one Redis-store replica and three replicas of
    another Redis store, all running at once and measured in turns (every repeat visits each
    configuration), so that load from other work on the machine falls on all of them alike;
    then aggregate Attend throughput of 2 Redis replicas against 1, in alternating rounds."""
    keys, values = synthetic_cache(args.layers, args.tokens)
    profile = Profile("bench-svdq", args.layers, KV_HEADS, HEAD_DIM, rope=ROPE, codec=CodecConfig(method="svdq"))
    key_mb = keys.numel() * 2 / 1e6
    batch = 8
    queries = torch.randn(batch, Q_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(1)).half()
    with tempfile.TemporaryDirectory() as folder:
        redis = redis_process(Path(folder) / "redis")
        base = redis.url.rsplit("/", 1)[0]
        # separate Redis databases: the groups share the Redis process, not their data
        layout = {"memory store, 1 server": ["memory"], "redis store, 1 replica": [f"{base}/1"],
                  "redis store, 3 replicas": [f"{base}/2"] * 3, "throughput pair": [f"{base}/3"] * 2}
        processes = []
        try:
            servers = {}
            for name, stores in layout.items():
                servers[name] = [start_server(args.device, 1, "--store", store) for store in stores]
                processes += [process for process, _ in servers[name]]
            clients = {name: [KVCacheClient(address, timeout=600) for _, address in started]
                       for name, started in servers.items()}
            for group in clients.values():
                group[0].register_profile(profile, replace=True)
            samples = {name: {"upload": [], "cold": [], "warm": []} for name in layout if name != "throughput pair"}
            for repeat in range(args.repeats):
                for name, measured in samples.items():
                    group = clients[name]
                    sequence = f"store-bench-{repeat}-{uuid.uuid4().hex[:6]}"
                    began = time.perf_counter()
                    group[0].upload(sequence, profile.name, keys, values, positions=torch.arange(args.tokens),
                                    key_space="post_rope")
                    measured["upload"].append(time.perf_counter() - began)
                    entries = [(sequence, index % args.layers) for index in range(batch)]
                    # cold: the first Attend on a replica (with several: ones that never saw the
                    # sequence and load it from Redis); warm: the same call again there
                    for client in group[1:] or group:
                        began = time.perf_counter()
                        client.attend(queries, entries)
                        measured["cold"].append(time.perf_counter() - began)
                        for _ in range(max(1, args.iterations // (args.repeats * len(group[1:] or group)))):
                            began = time.perf_counter()
                            client.attend(queries, entries)
                            measured["warm"].append(time.perf_counter() - began)
                    print(f"# {name} {repeat}: upload {measured['upload'][-1]:.2f} s, cold "
                          f"{1e3 * measured['cold'][-1]:.0f} ms", file=sys.stderr, flush=True)
            # aggregate throughput over one Redis store: 1 replica vs 2, one torch thread each,
            # alternating rounds; the ratio is the median of the rounds' ratios
            pair = [address for _, address in servers["throughput pair"]]
            sequences = [f"throughput-{index}" for index in range(2)]
            for sequence in sequences:
                clients["throughput pair"][0].upload(sequence, profile.name, keys, values, replace=True,
                                                     positions=torch.arange(args.tokens), key_space="post_rope")
            pair_processes = [psutil.Process(process.pid) for process, _ in servers["throughput pair"]]
            import redis as redis_client  # the [redis] extra, only for this part

            pair_redis = redis_client.Redis.from_url(f"{base}/3")
            rounds = []
            for _ in range(args.rounds):
                one = measured_throughput(pair[:1], pair_processes[:1], pair_redis, sequences, args, batch)
                two = measured_throughput(pair, pair_processes, pair_redis, sequences, args, batch)
                rounds.append((one, two))
                print(f"# throughput round: 1 replica {one.calls_per_second:.1f}/s, 2 replicas "
                      f"{two.calls_per_second:.1f}/s", file=sys.stderr, flush=True)
            pair_redis.close()
            for group in clients.values():
                for client in group:
                    client.close()
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
            redis.kill()
    print(f"store backends on loopback (device {args.device}, every server --torch-threads 1), {args.layers} layers x "
          f"{args.tokens} tokens x {KV_HEADS} KV heads x {HEAD_DIM}, svdq 1.5 b/e, values 16-bit; keys in: "
          f"{key_mb:.1f} MB fp16; one redis-server with deploy/redis/redis.conf (appendfsync always); Attend batch "
          f"{batch}, dense; {args.repeats} uploads per row, configurations measured in turns\n")
    print("| store | upload MB/s | Attend cold p50 ms | cold p99 ms | cold n | Attend warm p50 ms | warm p99 ms | warm n |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = {}
    for name, measured in samples.items():
        cold, warm = measured["cold"], measured["warm"]
        rows[name] = (key_mb / statistics.median(measured["upload"]), statistics.median(cold), statistics.median(warm))
        print(f"| {name} | {rows[name][0]:.1f} | {1e3 * rows[name][1]:.1f} | {1e3 * percentile(cold, 0.99):.1f} | "
              f"{len(cold)} | {1e3 * rows[name][2]:.1f} | {1e3 * percentile(warm, 0.99):.1f} | {len(warm)} |")
    memory = rows["memory store, 1 server"]
    print("\nratios vs the memory store (medians; >1 is slower): " + "; ".join(
        f"{name}: upload time {memory[0] / row[0]:.2f}x, cold {row[1] / memory[1]:.2f}x, warm {row[2] / memory[2]:.2f}x"
        for name, row in rows.items() if row is not memory))
    print(f"\naggregate Attend throughput over one Redis store, one client calling each replica back to back, "
          f"{len(rounds)} alternating rounds of {args.seconds:.0f} s (machine: {os.cpu_count()} cores, shared with "
          f"other jobs; load average after: {', '.join(f'{load:.1f}' for load in os.getloadavg())}). The replicas' "
          "CPU is what they were given (user + system seconds per wall second); each Attend costs the server its "
          "CPU ms whatever the replica count, so the throughput follows the cores the replicas get. Redis commands "
          "count the version check's script as 4 (EVALSHA and the ZSCORE, TIME, HGET it runs):\n")
    print("| replicas | Attend calls/s | replicas' CPU cores | server CPU ms per call | machine idle | "
          "Redis commands per call | MULTI/EXEC (loads, writes) | LRU writes (ZADD) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for count, index in ((1, 0), (2, 1)):
        runs = [measured[index] for measured in rounds]
        print(f"| {count} | {statistics.median(run.calls_per_second for run in runs):.1f} | "
              f"{statistics.median(run.cores for run in runs):.2f} | "
              f"{statistics.median(run.cpu_ms_per_call for run in runs):.1f} | "
              f"{statistics.median(run.idle for run in runs):.0%} | "
              f"{statistics.median(run.commands_per_call for run in runs):.2f} | "
              f"{sum(run.transactions for run in runs)} | {sum(run.lru_writes for run in runs)} |")
    ratios = [two.calls_per_second / one.calls_per_second for one, two in rounds]
    cores = [two.cores / one.cores for one, two in rounds]
    print(f"\n2 replicas vs 1: throughput ratio per round {', '.join(f'{ratio:.2f}' for ratio in ratios)}, median "
          f"{statistics.median(ratios):.2f}x; the replicas' CPU cores ratio per round "
          f"{', '.join(f'{ratio:.2f}' for ratio in cores)}, median {statistics.median(cores):.2f}x")


def upload_stages(keys: torch.Tensor, values: torch.Tensor, profile: Profile, repeats: int) -> dict[str, list[float]]:
    """Seconds of each stage of one upload of ``keys``/``values`` under ``profile``, run in
    this process with the client's and the server's own code, in turns over ``repeats``
    rounds: what an upload pays besides the codec (which the last row times alone)."""
    from svdq_client.client import DEFAULT_CHUNK_BYTES, upload_messages
    from svdq_proto.svdq.v1 import kvcache_pb2 as pb
    from svdq_server import convert
    from svdq_server.engine import Engine, EngineConfig, UploadHeader
    from svdq_server.metrics import Metrics

    metrics = Metrics()
    engine = Engine(EngineConfig(device="cpu", store_bytes=1 << 34), [profile], metrics=metrics)
    metrics.bind_engine(engine, "bench")
    positions = torch.arange(keys.shape[1])

    def chunks():
        return list(upload_messages("stages", profile.name, keys, values, positions, "post_rope", False, "u",
                                    DEFAULT_CHUNK_BYTES))

    wires = [chunk.SerializeToString() for chunk in chunks()]
    parsed = [pb.UploadChunk.FromString(wire) for wire in wires]
    count = iter(range(1 << 30))

    def whole_upload():
        header = UploadHeader(f"stages-{next(count)}", profile.name, "u", keys.shape[1], "post_rope", False, True)
        engine.begin_upload("bench", header)
        for chunk in parsed:
            engine.add_chunk("bench", header, convert.upload_chunk_from_pb(chunk))
        return engine.finish_upload("bench", header)

    info = whole_upload()
    layer_keys = compress(keys[0], profile.codec, positions=positions, rope=profile.rope, key_space="post_rope")
    stages = {
        f"client: {len(wires)} chunks built and serialized (upload_messages, SerializeToString)":
            lambda: [chunk.SerializeToString() for chunk in chunks()],
        "server: chunk bytes parsed (UploadChunk.FromString)": lambda: [pb.UploadChunk.FromString(w) for w in wires],
        "server: chunk tensors decoded and checked finite (upload_chunk_from_pb)":
            lambda: [convert.upload_chunk_from_pb(chunk) for chunk in parsed],
        "engine: the upload (chunks decoded, staged, each layer compressed, stored, metrics)": whole_upload,
        "  of it: the metrics' error sample of one layer (decompress, relative error)":
            lambda: engine._error_sample(keys[0], layer_keys),
        "server: the reply (UploadResponse serialized)":
            lambda: pb.UploadResponse(sequence=info.to_pb()).SerializeToString(),
        "codec alone: every layer's keys and values (as the engine calls it)":
            lambda: codec_seconds(profile, keys, values),
    }
    samples: dict[str, list[float]] = {name: [] for name in stages}
    for _ in range(repeats):
        for name, call in stages.items():
            began = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - began)
    return samples


def server_stages(args, keys: torch.Tensor, values: torch.Tensor, profile: Profile) -> dict[str, list[float]]:
    """Seconds of each server-side stage of one batch-1 Attend, run in this process with the
    server's own code (engine, store, metrics, conversions, interceptor's tenant lookup), in
    turns over ``args.iterations`` rounds: what an RPC pays besides the attention itself."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from svdq_client.client import attend_request, attend_result
    from svdq_proto.svdq.v1 import kvcache_pb2 as pb
    from svdq_server import convert
    from svdq_server.auth import TokenAuthenticator
    from svdq_server.engine import Engine, EngineConfig, UploadHeader
    from svdq_server.metrics import Metrics

    from svdq.attention import attend

    metrics = Metrics()
    engine = Engine(EngineConfig(device="cpu"), [profile], metrics=metrics)
    metrics.bind_engine(engine, "bench")
    header = UploadHeader("stages", profile.name, "stages", keys.shape[1], "post_rope", False, True)
    engine.upload("bench", header, keys, values, torch.arange(keys.shape[1]))
    # SmolLM2's 30 layers, for the reply of a Describe or Append (the sizes of every layer)
    deep = Profile("bench-deep", 30, KV_HEADS, HEAD_DIM, rope=ROPE, codec=profile.codec)
    engine.register_profile(deep)
    deep_keys, deep_values = synthetic_cache(30, 512)
    engine.upload("bench", UploadHeader("deep", deep.name, "deep", 512, "post_rope", False, True), deep_keys,
                  deep_values, torch.arange(512))
    deep_state = engine.store.get("bench", "deep").state
    authenticator = TokenAuthenticator.from_sources(None, "bench=bench-token-0123456789")
    queries = torch.randn(1, Q_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(2)).half()
    wire = attend_request(queries, [("stages", 0)], None, None).SerializeToString()
    request = pb.AttendRequest.FromString(wire)
    arguments = convert.attend_args_from_pb(request)
    state = engine.store.get("bench", "stages").state
    result = engine.attend("bench", **arguments)
    # batch 8 (one sequence per entry, as the RPC rows): the conversions on both sides that grow with the batch
    wide = 8
    for index in range(1, wide):
        engine.upload("bench", dataclasses.replace(header, sequence_id=f"stages-{index}", upload_id=f"stages-{index}"),
                      keys, values, torch.arange(keys.shape[1]))
    wide_entries = [("stages", 0)] + [(f"stages-{index}", 0) for index in range(1, wide)]
    wide_queries = torch.randn(wide, Q_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(3)).half()
    wide_request = attend_request(wide_queries, wide_entries, None, None)
    wide_result = engine.attend("bench", **convert.attend_args_from_pb(wide_request))
    wide_response = convert.attend_result_to_pb(wide_result).SerializeToString()
    executor = ThreadPoolExecutor(max_workers=args.workers[0])
    loop = asyncio.new_event_loop()

    async def hop():
        await loop.run_in_executor(executor, int)

    stages = {
        "parse request bytes (AttendRequest.FromString)": lambda: pb.AttendRequest.FromString(wire),
        "tenant from bearer token (interceptor)": lambda: authenticator.tenant_for("Bearer bench-token-0123456789"),
        "request -> engine arguments (ids, queries tensor, finite check)": lambda: convert.attend_args_from_pb(request),
        "store lookup (store.get)": lambda: engine.store.get("bench", "stages"),
        "attention itself (svdq.attention.attend)": lambda: attend(arguments["queries"], [state.keys[0]],
                                                                   [state.values[0]]),
        "engine.attend (checks, lookup, attention, finite output, metrics)": lambda: engine.attend("bench", **arguments),
        "metrics (attended + rpc_finished)": lambda: (metrics.attended(1, "dense", 1, 1),
                                                      metrics.rpc_finished("Attend", "OK", 0.001)),
        "result -> response bytes (attend_result_to_pb, serialize)":
            lambda: convert.attend_result_to_pb(result).SerializeToString(),
        "event loop -> worker thread -> event loop (run_in_executor)": lambda: loop.run_until_complete(hop()),
        f"batch {wide}: client request -> bytes (attend_request, serialize)":
            lambda: attend_request(wide_queries, wide_entries, None, None).SerializeToString(),
        f"batch {wide}: request -> engine arguments": lambda: convert.attend_args_from_pb(wide_request),
        f"batch {wide}: engine.attend": lambda: engine.attend("bench", **convert.attend_args_from_pb(wide_request)),
        f"batch {wide}: result -> response bytes": lambda: convert.attend_result_to_pb(wide_result).SerializeToString(),
        f"batch {wide}: client response bytes -> result (parse, attend_result)":
            lambda: attend_result(pb.AttendResponse.FromString(wide_response)),
        "Describe/Append reply info, 30 layers x 512 tokens (engine.describe)": lambda: engine.describe("bench", "deep"),
        "  the same sizes recomputed from every layer (before: not kept with the state)": lambda: (
            sum(layer.nbytes for layer in deep_state.keys), sum(layer.nbytes for layer in deep_state.values)),
    }
    samples: dict[str, list[float]] = {name: [] for name in stages}
    try:
        for call in stages.values():
            call()
        for _ in range(args.iterations):
            for name, call in stages.items():
                began = time.perf_counter()
                call()
                samples[name].append(time.perf_counter() - began)
    finally:
        loop.close()
        executor.shutdown()
    return samples


def baseline_tree(revision: str, root: Path) -> Path:
    """A folder holding this repository's packages as of git ``revision`` under their import
    names: a server started in it (:func:`start_server` ``packages``) runs that commit's code,
    what a before/after comparison starts beside the working tree's server."""
    repository = Path(__file__).resolve().parents[1]
    tree = root / "tree"
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(repository), "archive", revision], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    packages = root / "packages"
    packages.mkdir()
    for name, folder in (("svdq", "svdq"), ("svdq_server", "server"), ("svdq_client", "client"),
                         ("svdq_proto", "proto")):
        (packages / name).symlink_to(tree / folder)
    return packages


def bench_attend(args) -> None:
    """Attend through the server against the same attention in this process and a bare round
    trip (the gRPC health check), measured in turns (every iteration visits each row, the
    order rotated), with batches over different sequences, and a 30-layer Describe; the
    server-side stages of one Attend; then p50/p99 of ``--clients`` concurrent clients calling
    back to back. Several servers (each ``--workers`` value, and ``--baseline REV``: the same
    server from an older commit) are measured side by side in the same turns."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from svdq import compress
    from svdq.attention import attend
    from svdq.values import compress_values

    keys, values = synthetic_cache(1, args.tokens)
    deep_keys, deep_values = synthetic_cache(30, 512)
    batches = (1, 2, 8)
    count = max(max(batches), args.clients)
    profile = Profile("bench-attend", 1, KV_HEADS, HEAD_DIM, rope=ROPE, codec=CodecConfig(method="svdq"))
    deep = Profile("bench-deep", 30, KV_HEADS, HEAD_DIM, rope=ROPE, codec=profile.codec)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)  # the in-process rows run as the server does
    # ... and under the server's attention-cache budget: without a limit, nothing optional (the
    # kept float16 keys) is kept, and the in-process rows would rebuild what the server keeps
    from svdq_server.config import Settings

    from svdq.derived import DERIVED

    DERIVED.limit_bytes = Settings().attention_cache_bytes
    stages = server_stages(args, keys, values, profile)
    processes: list[subprocess.Popen] = []
    servers: list[tuple[str, str]] = []  # (label, address)
    if args.address:
        servers.append((args.address, args.address))
    else:
        for workers in args.workers:
            for inline in args.inline_attend_tokens:
                extra = () if inline is None else ("--inline-attend-tokens", str(inline))
                process, address = start_server(args.device, args.torch_threads, "--workers", str(workers), *extra)
                processes.append(process)
                servers.append((" ".join(("--workers", str(workers), *extra)), address))
        if args.baseline:
            scratch = tempfile.TemporaryDirectory(prefix="svdq-baseline-")
            process, address = start_server(args.device, args.torch_threads, "--workers", str(args.workers[0]),
                                            packages=baseline_tree(args.baseline, Path(scratch.name)))
            processes.append(process)
            servers.append((f"{args.baseline}, --workers {args.workers[0]}", address))
    sequences = [f"attend-bench-{index}-{uuid.uuid4().hex[:6]}" for index in range(count)]
    clients = []
    try:
        for _, address in servers:
            client = KVCacheClient(address, timeout=600)
            clients.append(client)
            register_unary(client, profile)
            register_unary(client, deep)
            for sequence in sequences:
                client.upload(sequence, profile.name, keys, values, positions=torch.arange(args.tokens),
                              key_space="post_rope")
            client.upload("deep", deep.name, deep_keys, deep_values, positions=torch.arange(512),
                          key_space="post_rope", replace=True)
        # The same compression in this process: one object per sequence, like the server's store.
        local_keys = [compress(keys[0], profile.codec, positions=torch.arange(args.tokens), rope=ROPE,
                               key_space="post_rope") for _ in range(max(batches))]
        local_values = [compress_values(values[0]) for _ in range(max(batches))]
        generator = torch.Generator().manual_seed(1)
        queries = {batch: torch.randn(batch, Q_HEADS, HEAD_DIM, generator=generator).half() for batch in batches}
        calls = {}
        for (label, _), client in zip(servers, clients, strict=True):
            # on the client's own connection: the floor of exactly the path an Attend takes
            health = health_pb2_grpc.HealthStub(client._channels[0])
            calls[f"round trip (grpc.health.v1 Check) [{label}]"] = (
                lambda health=health: health.Check(health_pb2.HealthCheckRequest()))
            calls[f"GetServerInfo [{label}]"] = client.server_info
            calls[f"Describe, 30 layers x 512 tokens [{label}]"] = lambda client=client: client.describe("deep")
            for batch in batches:
                entries = [(sequence, 0) for sequence in sequences[:batch]]
                calls[f"Attend RPC, batch {batch} [{label}]"] = (lambda client=client, batch=batch, entries=entries:
                                                                 client.attend(queries[batch], entries))
        for batch in batches:
            calls[f"attend in-process, batch {batch}"] = (
                lambda batch=batch: attend(queries[batch], local_keys[:batch], local_values[:batch]))
        samples: dict[str, list[float]] = {name: [] for name in calls}
        for call in calls.values():
            call()  # warm-up: the server's attention cache, this process's too
        load_before = os.getloadavg()
        names = list(calls)
        for iteration in range(args.iterations):
            # Each row takes every place in the turn equally often: the first call after the
            # in-process rows' computation pays the client's wake-up, whichever it is.
            shift = iteration % len(names)
            for name in names[shift:] + names[:shift]:
                began = time.perf_counter()
                calls[name]()
                samples[name].append(time.perf_counter() - began)
        single = torch.randn(1, Q_HEADS, HEAD_DIM, generator=generator).half()
        # rounds[r][i]: (latencies, seconds, server CPU seconds) of server i in round r; servers take turns
        watched = [psutil.Process(process.pid) for process in processes] or [None]
        rounds = [[concurrent_clients(address, sequences[:args.clients], single, args.seconds, server)
                   for (_, address), server in zip(servers, watched, strict=True)] for _ in range(args.rounds)]
    finally:
        for client in clients:
            client.close()
        for process in processes:
            process.terminate()
            process.wait(timeout=60)
    threads_note = f", every server --torch-threads {args.torch_threads}" if processes else ""
    print(f"Attend (device {args.device}{threads_note}), one layer x {args.tokens} tokens x {KV_HEADS} KV "
          f"heads x {HEAD_DIM}, {Q_HEADS} query heads, svdq 1.5 b/e keys, 16-bit values, dense; batch entries over "
          f"different sequences; servers: {', '.join(label for label, _ in servers)}; {args.iterations} iterations, "
          f"rows measured in turns (order rotated); load average before "
          f"{', '.join(f'{load:.1f}' for load in load_before)}\n")
    print("| call | p50 ms | p99 ms |")
    print("| --- | ---: | ---: |")
    p50 = {name: statistics.median(times) for name, times in samples.items()}
    for name, times in samples.items():
        print(f"| {name} | {1e3 * p50[name]:.2f} | {1e3 * percentile(times, 0.99):.2f} |")
    print()
    for label, _ in servers:
        floor = p50[f"round trip (grpc.health.v1 Check) [{label}]"]
        print(f"service overhead [{label}] (RPC p50 - in-process p50 - round trip p50; target <= +0.5 ms at batch 1): "
              + "; ".join(f"batch {b}: {1e3 * (p50[f'Attend RPC, batch {b} [{label}]'] - p50[f'attend in-process, batch {b}'] - floor):+.2f} ms"
                          for b in batches))
    if len(servers) > 1:
        first = servers[0][0]
        for label, _ in servers[1:]:
            print(f"[{label}] / [{first}] (p50): " + "; ".join(
                f"{row}: {p50[f'{row} [{label}]'] / p50[f'{row} [{first}]']:.2f}x"
                for row in ["round trip (grpc.health.v1 Check)", "Describe, 30 layers x 512 tokens",
                            *(f"Attend RPC, batch {b}" for b in batches)]))
    print(f"\nserver-side stages of one batch-1 Attend (and the conversions of a batch-8 one, the client's too), "
          f"in this process with the server's code (torch threads {torch.get_num_threads()}), {args.iterations} "
          "rounds in turns:\n")
    print("| stage | p50 us | p99 us |")
    print("| --- | ---: | ---: |")
    for name, times in stages.items():
        print(f"| {name} | {1e6 * statistics.median(times):.0f} | {1e6 * percentile(times, 0.99):.0f} |")
    print(f"\n{args.clients} concurrent clients, batch 1 each, {args.rounds} rounds of {args.seconds:.0f} s, servers "
          f"in turns (machine: {os.cpu_count()} cores, shared; load average after "
          f"{', '.join(f'{load:.1f}' for load in os.getloadavg())}; target p99 <= 4x p50):\n")
    print("| server | calls/s | p50 ms | p99 ms | p99 / p50 | per round p99 / p50 | server CPU ms per call |")
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for index, (label, _) in enumerate(servers):
        runs = [measured[index] for measured in rounds]
        latencies = [latency for run, _, _ in runs for latency in run]
        ratio = percentile(latencies, 0.99) / statistics.median(latencies)
        cpu = (f"{1e3 * sum(seconds for _, _, seconds in runs) / len(latencies):.2f}" if processes else "-")
        print(f"| {label} | {len(latencies) / sum(seconds for _, seconds, _ in runs):.1f} | "
              f"{1e3 * statistics.median(latencies):.1f} | {1e3 * percentile(latencies, 0.99):.1f} | {ratio:.2f}x | "
              + ", ".join(f"{percentile(run, 0.99) / statistics.median(run):.2f}x" for run, _, _ in runs)
              + f" | {cpu} |")
    print(f"\n(server CPU: user + system seconds of the server process over its calls; the attention itself "
          f"takes {1e3 * statistics.median(stages['attention itself (svdq.attention.attend)']):.2f} ms at the "
          "median in this process)")


def concurrent_clients(address: str, sequences: list[str], queries: torch.Tensor, seconds: float,
                       server: psutil.Process | None = None) -> tuple[list[float], float, float]:
    """Latencies of one client per sequence calling Attend back to back for ``seconds``, the
    wall seconds they ran, and the CPU seconds ``server`` spent meanwhile (0 without one)."""
    latencies: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(len(sequences) + 1)
    stop = threading.Event()

    def worker(sequence):
        mine = []
        with KVCacheClient(address, timeout=600) as own:
            own.attend(queries, [(sequence, 0)])
            start.wait()
            while not stop.is_set():
                began = time.perf_counter()
                own.attend(queries, [(sequence, 0)])
                mine.append(time.perf_counter() - began)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(sequence,)) for sequence in sequences]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    cpu_before = sum(server.cpu_times()[:2]) if server is not None else 0.0
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    cpu = sum(server.cpu_times()[:2]) - cpu_before if server is not None else 0.0
    return latencies, time.perf_counter() - began, cpu


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", help="use a running server instead of starting one")
    parser.add_argument("--device", default="cpu", help="device of the started server: cpu, cuda, auto")
    parser.add_argument("--torch-threads", type=int, default=0, help="--torch-threads of the started server")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=60, help="Attend calls at batch 1 (fewer at larger batches)")
    parser.add_argument("--repeats", type=int, default=3, help="uploads per profile (median reported)")
    parser.add_argument("--part", choices=("codecs", "uploads", "stores", "attend"), default="codecs",
                        help="codecs: svdq vs fp16 passthrough on one server; uploads: only their upload rows, "
                             "beside the codec's own time; stores: memory vs Redis store backends; attend: Attend "
                             "RPC vs the same attention in-process and a bare round trip, and under concurrent clients")
    parser.add_argument("--clients", type=int, default=32, help="--part attend: concurrent clients")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="--part stores: seconds per throughput run; --part attend: of the concurrent clients")
    parser.add_argument("--rounds", type=int, default=3, help="--part stores: alternating 1-vs-2-replica rounds; "
                        "--part attend: rounds of the concurrent clients per server")
    parser.add_argument("--inline-attend-tokens", type=lambda text: [int(value) for value in text.split(",")],
                        default=[None], help="--part attend: --inline-attend-tokens of the started servers (default: "
                        "the server's); several (e.g. 16384,0) start one server each, measured in the same turns")
    parser.add_argument("--workers", type=lambda text: [int(value) for value in text.split(",")], default=[8],
                        help="--part attend: --workers of the started server; several (e.g. 8,2) start one server "
                             "each, the concurrent clients measured against each in turns")
    parser.add_argument("--baseline", help="--part attend, codecs, uploads: also start the server of this git "
                        "revision (e.g. a commit before a change) and measure it in the same turns")
    args = parser.parse_args(argv)
    if args.part == "stores":
        bench_stores(args)
        return
    if args.part == "attend":
        bench_attend(args)
        return

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)  # the codec-alone column runs like the server
    processes: list[subprocess.Popen] = []
    servers: dict[str, str] = {}  # label -> address
    pids: dict[str, int] = {}  # label -> process, of the servers started here
    scratch = None
    if args.address:
        servers[args.address] = args.address
    else:
        process, address = start_server(args.device, args.torch_threads)
        processes.append(process)
        servers["working tree"] = address
        pids["working tree"] = process.pid
        if args.baseline:
            scratch = tempfile.TemporaryDirectory(prefix="svdq-baseline-")
            process, address = start_server(args.device, args.torch_threads,
                                            packages=baseline_tree(args.baseline, Path(scratch.name)))
            processes.append(process)
            servers[args.baseline] = address
            pids[args.baseline] = process.pid
    clients: dict[str, KVCacheClient] = {}
    try:
        keys, values = synthetic_cache(args.layers, args.tokens)
        batches = (1, 8, 64) if args.part == "codecs" else ()
        iterations = {1: args.iterations, 8: max(10, args.iterations // 3), 64: max(5, args.iterations // 10)}
        configs = [
            ("svdq 1.5 b/e, dense", CodecConfig(method="svdq"), None),
            ("svdq 1.5 b/e, sparse 1/8", CodecConfig(method="svdq"), Sparsity(keep_fraction=1 / 8)),
            ("fp16 passthrough (off)", CodecConfig(method="fp16"), None),
        ]
        if not batches:  # the sparse row uploads exactly like the dense one
            configs = [config for config in configs if config[2] is None]
        results = {}
        first_rows = {}  # the first server's rows, what the ratios vs fp16 compare
        # the client's default chunk size: what an upload through the library sends
        clients = {label: KVCacheClient(address, timeout=600) for label, address in servers.items()}
        first = next(iter(clients.values()))
        server = first.server_info()
        floor = []
        for _ in range(args.iterations):
            started = time.perf_counter()
            first.server_info()
            floor.append(time.perf_counter() - started)
        for name, codec, sparsity in configs:
            profile = Profile(f"bench-{codec.method}", args.layers, KV_HEADS, HEAD_DIM, rope=ROPE, codec=codec)
            for client in clients.values():
                register_unary(client, profile)
            rows = bench_profile(clients, profile, keys, values, batches, iterations, sparsity, args.repeats, pids)
            first_rows[name] = next(iter(rows.values()))
            for label, row in rows.items():
                results[name if len(clients) == 1 else f"{name} [{label}]"] = row
        baseline = first_rows["fp16 passthrough (off)"]
        threads = f", server --torch-threads {args.torch_threads}" if processes else ""
        print(f"svdq service on {', '.join(f'{label} {address}' for label, address in servers.items())} (device "
              f"{server.device}{threads}), {args.layers} layers x {args.tokens} tokens x "
              f"{KV_HEADS} KV heads x {HEAD_DIM}, queries {Q_HEADS} heads; keys in: "
              f"{keys.numel() * 2 / 1e6:.1f} MB fp16 (and as many 16-bit values); codec alone: every layer's keys and "
              f"values compressed in this process as the server's engine does; medians over {args.repeats} uploads, "
              "servers and the codec in turns, page faults: the server process's minor faults during an upload "
              "(median), server CPU: user + system seconds of the server process (every thread) over all uploads, "
              "over the codec's over all rounds, "
              + (f"{iterations} Attend calls per batch size" if batches else "no Attend calls (--part uploads)") + "\n")
        header = ["config", "upload MB/s", "codec alone MB/s", "upload / codec time (median of rounds)",
                  "server page faults per upload", "server CPU / codec CPU (sums)", "key bytes stored", "key ratio",
                  "value bytes"] + [f"B={b} {cell}" for b in batches for cell in ("p50 ms", "p99 ms", "q/s")]
        print("| " + " | ".join(header) + " |")
        print("| --- " * (9 + 3 * len(batches)) + "|")
        for name, row in results.items():
            cells = [name, f"{row['upload_mb_s']:.1f}", f"{row['codec_mb_s']:.1f}", f"{row['upload_over_codec']:.2f}x",
                     "-" if row["faults"] is None else f"{row['faults']:,.0f}",
                     "-" if row["cpu_over_codec"] is None else f"{row['cpu_over_codec']:.2f}x", f"{row['key_bytes']:,}",
                     f"{row['fp16_key_bytes'] / row['key_bytes']:.2f}x", f"{row['value_bytes']:,}"]
            for batch in batches:
                p50, p99, qps = row["attend"][batch]
                cells += [f"{1e3 * p50:.2f}", f"{1e3 * p99:.2f}", f"{qps:.0f}"]
            print("| " + " | ".join(cells) + " |")
        print(f"\ngRPC round-trip floor (GetServerInfo, no compute): p50 {1e3 * statistics.median(floor):.2f} ms, "
              f"p99 {1e3 * percentile(floor, 0.99):.2f} ms")
        print("ratios vs fp16 passthrough (median latency of the compressed config / fp16; <1 is faster):")
        for name, row in first_rows.items():
            if row is baseline:
                continue
            ratios = ", ".join(f"B={b}: {row['attend'][b][0] / baseline['attend'][b][0]:.2f}" for b in batches)
            print(f"  {name}: upload time {baseline['upload_mb_s'] / row['upload_mb_s']:.2f}x"
                  + (f"; attend {ratios}" if batches else ""))
        if args.baseline and not args.address:
            print(f"upload time, working tree / {args.baseline} (medians): " + "; ".join(
                f"{name}: {results[f'{name} [{args.baseline}]']['upload_mb_s'] / results[f'{name} [working tree]']['upload_mb_s']:.2f}x"
                for name, _, _ in configs))
        profile = Profile("bench-stages", args.layers, KV_HEADS, HEAD_DIM, rope=ROPE, codec=CodecConfig(method="svdq"))
        stages = upload_stages(keys, values, profile, args.repeats)
        codec = statistics.median(stages[next(name for name in stages if name.startswith("codec alone"))])
        print(f"\nstages of one svdq 1.5 b/e upload (keys and 16-bit values), in this process with the client's and the "
              f"server's code (torch threads {torch.get_num_threads()}), {args.repeats} rounds in turns; the engine row "
              "includes the decode and the error sample; over the network the client's and the transfer's share "
              "overlaps the server compressing the previous layer; one thread of this process, so the server's page "
              "faults (its worker threads' memory, the table's column above) are not in it:\n")
        print("| stage | p50 ms | share of the codec alone |")
        print("| --- | ---: | ---: |")
        for name, times in stages.items():
            print(f"| {name} | {1e3 * statistics.median(times):.1f} | {statistics.median(times) / codec:.2f} |")
    finally:
        for client in clients.values():
            client.close()
        for process in processes:
            process.terminate()
            process.wait(timeout=60)
        if scratch is not None:
            scratch.cleanup()

if __name__ == "__main__":
    main()
