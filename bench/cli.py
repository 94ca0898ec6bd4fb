"""`wqs-bench`: fio's command line and reports, for a WQS cluster (and its peers).

    wqs-bench --servers=127.0.0.1:7070 --name=r --rw=randread --bs=64k --size=256m \\
              --iodepth=32 --runtime=10 --time_based
    wqs-bench --servers=127.0.0.1:7070 jobs.fio --output-format=json --output=out.json
    wqs-bench --servers=127.0.0.1:7070 --name=chat --workload=prefix --model=llama-3-8b \\
              --conversations=64 --iodepth=4

Options are fio's (see bench/WQS_BENCH.md for the list and how each maps onto a KV
store); options before the first --name are global, each --name starts a job.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Sequence

from .engines import Engine, EngineError, make_engine
from .fioparse import (OUTPUT_FORMATS, FioOptionError, JobSpec, assign_groups,
                            build_jobs, split_argv)
from .report import JobResult, header_lines, merge_results, normal_text, to_json

USAGE = """\
usage: wqs-bench [global options] [--name=JOB [job options]]... [jobfile]...

cluster:   --servers=HOST:PORT[,HOST:PORT]  --config=client.yaml
           --control_servers=HOST:PORT[,...]  (daemons' control planes, for their CPU;
           default: each data port + 1)
           --ioengine=wqs|redis|files|rawsock|null   (--redis=HOST:PORT, --files_dir=DIR
           [--files_direct], --rawsock=HOST:PORT for the other engines)
fio job:   --name --rw=read|write|randread|randwrite|rw|randrw --rwmixread=PCT
           --bs=SIZE[,SIZE] --bsrange=MIN-MAX --size=SIZE --io_size=SIZE --iodepth=N
           --iodepth_batch=N --numjobs=N --runtime=TIME --time_based --ramp_time=TIME
           --verify=crc32c|md5|...|0 --filename=NAMESPACE --randseed=N
           --percentile_list=P:P:... --lat_percentiles --group_reporting --stonewall
kv-cache:  --workload=prefix --model=llama-3-8b|deepseek-v3|... --block_tokens=16
           --kv_dtype=bf16|fp8 --kv_bytes_per_token=SIZE --conversations=N
           --system_prompt_tokens=N --save_decode --seed=N
output:    --output-format=normal|json[,normal] --output=FILE --eta=auto|always|never
           --lat_cdf=FILE.png (latency CDF plot; needs matplotlib)
"""


def _log_to(stream: Any) -> Any:
    def log(msg: str) -> None:
        print(msg, file=stream, flush=True)

    return log


def _engine_key(spec: JobSpec) -> tuple:
    return (spec.ioengine, spec.redis, spec.files_dir, spec.files_direct, spec.rawsock)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        inv = split_argv(argv)
    except FioOptionError as e:
        print(f"wqs-bench: {e}", file=sys.stderr)
        return 1
    if "help" in inv.cli or not argv:
        print(USAGE, end="")
        return 0 if argv else 1
    if "version" in inv.cli:
        from wqs import __version__

        print(f"wqs-bench-{__version__}")
        return 0
    try:
        specs, global_options = build_jobs(inv)
        formats = [f.strip() for f in inv.cli.get("output_format", "normal").split(",") if f.strip()]
        for f in formats:
            if f not in OUTPUT_FORMATS or f == "terse":
                raise FioOptionError(f"output-format: wqs-bench writes normal, json or json+, "
                                     f"got {f!r}")
        eta_mode = inv.cli.get("eta", "auto")
        if eta_mode not in ("auto", "always", "never"):
            raise FioOptionError(f"eta: expected auto, always or never, got {eta_mode!r}")
        if not specs:
            raise FioOptionError("no jobs defined: give --name=JOB (or a job file)")
        for s in specs:
            if s.verify and s.ioengine in ("null", "rawsock"):
                raise FioOptionError(f"{s.name}: verify needs an engine that stores blocks "
                                     f"(ioengine={s.ioengine} does not)")
    except FioOptionError as e:
        print(f"wqs-bench: {e}", file=sys.stderr)
        return 1
    if "parse_only" in inv.cli:
        return 0

    out_path = inv.cli.get("output")
    to_stdout = out_path is None
    log = _log_to(sys.stdout if formats == ["normal"] and to_stdout else sys.stderr)
    for s in specs:
        if s.ignored:
            log(f"note: {s.name}: {', '.join(sorted(set(s.ignored)))} ignored "
                "(no meaning for a KV store)")
        if s.fio_ioengine:
            log(f"note: {s.name}: ioengine={s.fio_ioengine} is fio's; the IO goes to "
                f"ioengine={s.ioengine}")

    servers = [x.strip() for x in inv.cli.get("servers", "").split(",") if x.strip()]
    control_servers = [x.strip() for x in inv.cli.get("control_servers", "").split(",")
                       if x.strip()]
    total_threads = sum(s.numjobs * s.iodepth for s in specs)
    engines: dict[tuple, Engine] = {}
    groups = assign_groups(specs)
    results: list[JobResult] = []
    started = time.time()
    normal_chunks: list[str] = []
    try:
        try:
            for s in specs:
                key = _engine_key(s)
                if key not in engines:
                    engines[key] = make_engine(
                        s.ioengine, servers=servers, config=inv.cli.get("config"),
                        redis=s.redis, files_dir=s.files_dir, files_direct=s.files_direct,
                        rawsock=s.rawsock, threads=total_threads,
                        control_servers=control_servers or None)
        except (EngineError, OSError, ValueError) as e:
            print(f"wqs-bench: {e}", file=sys.stderr)
            return 1
        from .runner import Clone, run_group

        desc = ", ".join(sorted({e.describe() for e in engines.values()}))
        if "normal" in formats:
            head = "\n".join(header_lines(specs, groups, desc))
            if to_stdout:
                print(head, flush=True)
            else:
                normal_chunks.append(head)
        for g in sorted(set(groups)):
            clones: list[Clone] = []
            for s, sg in zip(specs, groups):
                if sg != g:
                    continue
                for k in range(s.numjobs):
                    seed = (s.randseed if s.randseed is not None else 0x89) * 1_000_003 + \
                        k * 7919 + sum(map(ord, s.name))
                    clones.append(Clone(s, k, g, engines[_engine_key(s)], seed))
            try:
                group_results = run_group(clones, eta_mode, log)
            except ValueError as e:  # e.g. an unknown model
                print(f"wqs-bench: {e}", file=sys.stderr)
                return 1
            if any(c.spec.group_reporting for c in clones):
                results.append(merge_results(group_results))
            else:
                results.extend(group_results)
    finally:
        for e in engines.values():
            e.close()

    doc = to_json(results, global_options, started,
                  extra={"engines": sorted({e.describe() for e in engines.values()})})
    texts = []
    for f in formats:
        if f in ("json", "json+"):
            texts.append(json.dumps(doc, indent=2))
        else:
            texts.append(("\n".join(normal_chunks) + "\n" if normal_chunks else "")
                         + normal_text(results, doc))
    body = "\n".join(texts)
    if out_path:
        with open(out_path, "w", encoding="utf-8") as f:
            f.write(body if body.endswith("\n") else body + "\n")
    else:
        sys.stdout.write(body if body.endswith("\n") else body + "\n")
    if inv.cli.get("lat_cdf"):
        try:
            from .cdf import plot_cdf

            plot_cdf(results, inv.cli["lat_cdf"])
            print(f"latency CDF written to {inv.cli['lat_cdf']}", file=sys.stderr)
        except ImportError as e:
            print(f"wqs-bench: --lat_cdf: {e}", file=sys.stderr)
            return 1
    failed = [r for r in results if r.error]
    for r in failed:
        print(f"wqs-bench: {r.name}: error {r.error}"
              + (f": {r.verify_errors} verify failure(s)" if r.verify_errors else "")
              + (f": {r.errors[0]}" if r.errors else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
