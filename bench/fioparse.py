"""fio's option language, for `wqs-bench`: sizes, times, the command line and job files.

The parsing follows fio 3.x, so a fio command line or job file means the same thing here:

* **Sizes** (``bs``, ``size``, ...): a whole number with an optional unit. With fio's
  default ``kb_base=1024`` a plain prefix is binary (``4k`` = ``4kb`` = 4096, ``1m`` =
  1 MiB) and, fio's compatibility quirk, an IEC prefix is decimal (``4KiB`` = 4000).
  With ``kb_base=1000`` it is the other way round. No unit means bytes. fio reads a
  decimal such as ``1.5k`` as 1 byte; wqs-bench refuses it.
* **Times** (``runtime``, ``ramp_time``): seconds unless suffixed with ``us``/``usec``,
  ``ms``/``msec``, ``s``/``sec``, ``m``/``min``, ``h`` or ``d``.
* **The command line**: options before the first ``--name`` are global; each ``--name``
  starts a job and the options after it belong to that job only. Other arguments are
  job files. ``--opt=value`` (fio's form) and ``--opt value`` both work; ``-`` and
  ``_`` are interchangeable in option names.
* **Job files**: INI sections, ``[global]`` applying to the sections after it, ``key``
  or ``key=value`` lines, ``;`` and ``#`` comments, ``${VAR}`` from the environment.
  Command-line global options override a file's ``[global]``; a job's own section
  overrides both.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

# fio's default clat percentiles.
DEFAULT_PERCENTILES = [1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0,
                       95.0, 99.0, 99.5, 99.9, 99.95, 99.99]

RW_MODES = {"read": "read", "write": "write", "randread": "randread",
            "randwrite": "randwrite", "rw": "rw", "readwrite": "rw", "randrw": "randrw"}
# fio's verify methods: any of them switches verification on (WQS-bench checks a header
# and the whole payload against its deterministic generator, whatever the name).
VERIFY_METHODS = {"md5", "crc64", "crc32c", "crc32c-intel", "crc32", "crc16", "crc7",
                  "xxhash", "sha512", "sha256", "sha1", "sha3-224", "sha3-256", "sha3-384",
                  "sha3-512", "meta", "pattern", "1"}
IOENGINES = ("wqs", "redis", "files", "rawsock", "null")
# fio's kernel IO engines: a job file written for fio names one; here the IO goes to
# the store chosen by --ioengine's default (wqs), so these are accepted and ignored.
FIO_IOENGINES = {"sync", "psync", "vsync", "pvsync", "pvsync2", "libaio", "io_uring",
                 "posixaio", "mmap", "splice", "net", "netsplice"}
OUTPUT_FORMATS = ("normal", "json", "json+", "terse")

# Options that belong to the invocation, not to a job (fio's command-line-only options
# plus the cluster and the plot).
CLI_ONLY = {"output", "output_format", "eta", "servers", "config", "control_servers",
            "lat_cdf", "help", "version", "parse_only", "quiet"}
# Of those, the ones a job file may set too (it may name its cluster).
JOB_FILE_CLI = ("servers", "config", "control_servers")

# Accepted for compatibility with fio job files; they have no meaning for a KV store.
IGNORED = {"direct", "buffered", "thread", "norandommap", "randrepeat", "invalidate",
           "end_fsync", "fsync", "fdatasync", "gtod_reduce", "refill_buffers",
           "zero_buffers", "iodepth_batch_complete", "iodepth_batch_complete_min",
           "iodepth_batch_complete_max", "iodepth_low", "eta_newline", "status_interval",
           "disk_util", "group_reporting_pct", "unified_rw_reporting", "overwrite",
           "create_on_open", "allrandrepeat", "log_avg_msec", "write_bw_log",
           "write_lat_log", "write_iops_log", "per_job_logs", "cpus_allowed",
           "exitall", "kb_base_unused", "fallocate", "nrfiles", "filesize",
           "verify_fatal", "do_verify", "verify_backlog", "verify_interval",
           "verify_offset", "verify_pattern"}

FLAGS = {"time_based", "group_reporting", "stonewall", "wait_for_previous", "new_group",
         "lat_percentiles", "clat_percentiles", "slat_percentiles", "save_decode",
         "help", "version", "parse_only", "quiet", "direct", "thread", "norandommap",
         "randrepeat", "end_fsync", "gtod_reduce", "refill_buffers", "zero_buffers",
         "overwrite", "exitall", "verify_fatal", "do_verify", "buffered"}

ALIASES = {"readwrite": "rw", "io_limit": "io_size", "iodepth_batch_submit": "iodepth_batch",
           "blocksize": "bs", "blocksize_range": "bsrange", "timeout": "runtime",
           "percentile_list": "percentile_list", "rwmixwrite": "rwmixwrite",
           "jobname": "name", "output_format": "output_format", "cdf": "lat_cdf"}

JOB_OPTIONS = {
    "name", "description", "rw", "rwmixread", "rwmixwrite", "bs", "bsrange", "iodepth",
    "iodepth_batch", "numjobs", "size", "io_size", "runtime", "time_based", "ramp_time",
    "group_reporting", "verify", "filename", "percentile_list", "lat_percentiles",
    "clat_percentiles", "slat_percentiles", "randseed", "stonewall", "wait_for_previous",
    "new_group", "ioengine", "kb_base", "workload", "model", "block_tokens",
    "kv_bytes_per_token", "kv_dtype", "conversations", "system_prompt_tokens",
    "save_decode", "seed", "redis", "files_dir", "files_direct", "rawsock", "namespace",
}


class FioOptionError(ValueError):
    """A bad option, worded the way fio words it."""


# ------------------------------------------------------------------------------- values

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgtpe]?)(i?)(b?)\s*$", re.IGNORECASE)
_POW = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}


def parse_size(value: str | int, kb_base: int = 1024) -> int:
    """Bytes from a fio size: ``4k``, ``64KiB``, ``1m``, ``1g``, ``4096``.

    With kb_base=1024 (fio's default): ``k``/``kb`` are 1024 and ``KiB`` is 1000;
    with kb_base=1000 it is the reverse. Case does not matter.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise FioOptionError(f"size must not be negative: {value}")
        return value
    text = str(value).strip()
    m = _SIZE_RE.match(text)
    if not m:
        raise FioOptionError(f"bad size {value!r}: expected a number with an optional "
                             "k/m/g/t suffix, e.g. 4k or 1m")
    number, prefix, iec, _b = m.group(1), m.group(2).lower(), m.group(3), m.group(4)
    if iec and not prefix:
        raise FioOptionError(f"bad size {value!r}")
    if "." in number:
        # fio 3.33 reads "1.5k" as 1 byte (it stops at the dot); refuse rather than guess
        raise FioOptionError(f"bad size {value!r}: use a whole number with a smaller unit "
                             "(e.g. 1536 or 1536k)")
    if kb_base == 1024:
        base = 1000 if iec else 1024
    else:
        base = 1024 if iec else 1000
    return int(number) * base ** _POW[prefix]


_TIME_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "us": 1e-6, "usec": 1e-6, "ms": 1e-3,
               "msec": 1e-3, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_TIME_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_time(value: str | float) -> float:
    """Seconds from a fio time: ``10`` (seconds), ``500ms``, ``2m``, ``1h``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    m = _TIME_RE.match(str(value))
    if not m or m.group(2).lower() not in _TIME_UNITS:
        raise FioOptionError(f"bad time {value!r}: expected seconds or a number with "
                             "us/ms/s/m/h/d")
    return float(m.group(1)) * _TIME_UNITS[m.group(2).lower()]


def parse_bool(key: str, value: str) -> bool:
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on", ""):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise FioOptionError(f"{key}: expected 0 or 1, got {value!r}")


def parse_int(key: str, value: str, lo: int = 0, hi: int | None = None) -> int:
    try:
        n = int(str(value).strip(), 0)
    except ValueError:
        raise FioOptionError(f"{key}: expected an integer, got {value!r}") from None
    if n < lo or (hi is not None and n > hi):
        raise FioOptionError(f"{key}: {n} is out of range [{lo}, {hi if hi is not None else 'inf'}]")
    return n


def parse_bs(value: str, kb_base: int = 1024) -> tuple[int, int]:
    """``bs=4k`` or ``bs=4k,64k`` (read, write[, trim]) -> (read bs, write bs).

    As in fio, an empty field keeps the default and a single value applies to all."""
    parts = [p.strip() for p in str(value).split(",")]
    if len(parts) > 3:
        raise FioOptionError(f"bs: at most read,write,trim sizes, got {value!r}")
    rd = parse_size(parts[0], kb_base) if parts[0] else 4096
    wr = parse_size(parts[1], kb_base) if len(parts) > 1 and parts[1] else rd
    if len(parts) == 1:
        wr = rd
    if rd <= 0 or wr <= 0:
        raise FioOptionError(f"bs must be positive, got {value!r}")
    return rd, wr


def parse_bsrange(value: str, kb_base: int = 1024) -> tuple[tuple[int, int], tuple[int, int]]:
    """``bsrange=1k-4k`` or ``1k-4k,2k-8k`` -> ((rmin, rmax), (wmin, wmax))."""
    parts = [p.strip() for p in str(value).split(",")]
    ranges = []
    for part in parts[:2]:
        lo, sep, hi = part.partition("-")
        if not sep:
            raise FioOptionError(f"bsrange: expected MIN-MAX, got {part!r}")
        a, b = parse_size(lo, kb_base), parse_size(hi, kb_base)
        if a <= 0 or b < a:
            a, b = min(a, b), max(a, b)  # fio swaps a reversed range
            if a <= 0:
                raise FioOptionError(f"bsrange: sizes must be positive, got {part!r}")
        ranges.append((a, b))
    if len(ranges) == 1:
        ranges.append(ranges[0])
    return ranges[0], ranges[1]


def parse_percentiles(value: str) -> list[float]:
    """fio's ``percentile_list=1:5:50:99.9`` (colon separated; fio also takes commas)."""
    out = []
    for part in re.split(r"[:,]", str(value)):
        if not part.strip():
            continue
        try:
            p = float(part)
        except ValueError:
            raise FioOptionError(f"percentile_list: bad value {part!r}") from None
        if not 0 <= p <= 100:
            raise FioOptionError(f"percentile_list: {p} is not in [0, 100]")
        out.append(p)
    if not out or len(out) > 20:
        raise FioOptionError("percentile_list: give 1 to 20 values")
    return out


def canonical(key: str) -> str:
    k = key.strip().lower().replace("-", "_")
    return ALIASES.get(k, k)


# ------------------------------------------------------------------------------ the job


@dataclass
class JobSpec:
    """One job section as fio understands it (before numjobs cloning)."""

    name: str
    options: dict[str, str] = field(default_factory=dict)  # the job's own, as given
    rw: str = "read"
    rwmixread: int = 50
    bs: tuple[int, int] = (4096, 4096)
    bsrange: tuple[tuple[int, int], tuple[int, int]] | None = None
    iodepth: int = 1
    iodepth_batch: int = 1
    numjobs: int = 1
    size: int | None = None
    io_size: int | None = None
    runtime: float | None = None
    time_based: bool = False
    ramp_time: float = 0.0
    verify: str | None = None
    filename: str | None = None
    percentile_list: list[float] = field(default_factory=lambda: list(DEFAULT_PERCENTILES))
    clat_percentiles: bool = True
    lat_percentiles: bool = False
    slat_percentiles: bool = False
    randseed: int | None = None
    stonewall: bool = False
    new_group: bool = False
    group_reporting: bool = False
    ioengine: str = "wqs"
    fio_ioengine: str | None = None  # the fio engine a job file named, ignored
    kb_base: int = 1024
    # --workload=prefix (KV-cache conversations)
    workload: str = "fio"
    model: str = "llama-3-8b"
    block_tokens: int = 16
    kv_bytes_per_token: int | None = None
    kv_dtype: str = "bf16"
    conversations: int = 32
    system_prompt_tokens: int = 0
    save_decode: bool = False
    seed: int = 1
    # where non-WQS engines find their store
    redis: str | None = None
    files_dir: str | None = None
    files_direct: bool = False
    rawsock: str | None = None
    ignored: list[str] = field(default_factory=list)

    @property
    def reads(self) -> bool:
        return self.rw in ("read", "randread", "rw", "randrw")

    @property
    def writes(self) -> bool:
        return self.rw in ("write", "randwrite", "rw", "randrw")

    @property
    def random(self) -> bool:
        return self.rw.startswith("rand")

    @property
    def read_pct(self) -> int:
        if self.rw in ("read", "randread"):
            return 100
        if self.rw in ("write", "randwrite"):
            return 0
        return self.rwmixread

    def bs_range(self, ddir: int) -> tuple[int, int]:
        """(min, max) IO size for direction 0 (read) or 1 (write)."""
        if self.bsrange is not None:
            return self.bsrange[ddir]
        return self.bs[ddir], self.bs[ddir]

    @property
    def slot_size(self) -> int:
        """The size of one block slot: the largest IO of either direction."""
        return max(self.bs_range(0)[1], self.bs_range(1)[1])

    @property
    def nslots(self) -> int:
        return max(1, (self.size or 0) // self.slot_size)

    @property
    def limit_bytes(self) -> int:
        """Bytes a non-time-based job moves before it ends (fio's io_size, or size)."""
        return self.io_size or self.size or 0


def build_job(name: str, merged: dict[str, str], own: dict[str, str]) -> JobSpec:
    """A JobSpec from option strings (merged: global + own; own: the job's section)."""
    job = JobSpec(name=name, options=dict(own))
    kb = parse_int("kb_base", merged.get("kb_base", "1024"))
    if kb not in (1000, 1024):
        raise FioOptionError(f"kb_base: must be 1000 or 1024, got {kb}")
    job.kb_base = kb
    for key, value in merged.items():
        _apply(job, key, value)
    if "rwmixwrite" in merged and "rwmixread" not in merged:
        job.rwmixread = 100 - parse_int("rwmixwrite", merged["rwmixwrite"], 0, 100)
    _check(job)
    return job


def _apply(job: JobSpec, key: str, value: str) -> None:
    kb = job.kb_base
    if key in ("name", "description", "kb_base", "rwmixwrite"):
        return
    if key == "rw":
        mode = str(value).strip().lower()
        if ":" in mode:
            mode = mode.split(":", 1)[0]
        if mode not in RW_MODES:
            raise FioOptionError(f"rw: unsupported mode {value!r} (wqs-bench does "
                                 f"{', '.join(sorted(set(RW_MODES)))})")
        job.rw = RW_MODES[mode]
    elif key == "rwmixread":
        job.rwmixread = parse_int(key, value, 0, 100)
    elif key == "bs":
        job.bs = parse_bs(value, kb)
    elif key == "bsrange":
        job.bsrange = parse_bsrange(value, kb)
    elif key in ("iodepth", "iodepth_batch", "numjobs"):
        setattr(job, key, parse_int(key, value, 1 if key != "iodepth_batch" else 0, 65536))
    elif key in ("size", "io_size"):
        setattr(job, key, parse_size(value, kb))
    elif key in ("runtime", "ramp_time"):
        t = parse_time(value)
        setattr(job, key, t if key == "ramp_time" else (t or None))
    elif key in ("time_based", "group_reporting", "stonewall", "new_group", "lat_percentiles",
                 "clat_percentiles", "slat_percentiles", "save_decode", "files_direct"):
        setattr(job, key, parse_bool(key, value))
    elif key == "wait_for_previous":
        job.stonewall = parse_bool(key, value)
    elif key == "verify":
        v = str(value).strip().lower()
        if v in ("0", "null", "none", ""):
            job.verify = None
        elif v in VERIFY_METHODS:
            job.verify = v
        else:
            raise FioOptionError(f"verify: unknown method {value!r}")
    elif key in ("filename", "namespace"):
        job.filename = str(value)
    elif key == "percentile_list":
        job.percentile_list = parse_percentiles(value)
    elif key in ("randseed", "seed"):
        setattr(job, key, parse_int(key, value, 0))
    elif key == "ioengine":
        eng = str(value).strip().lower()
        if eng in IOENGINES:
            job.ioengine = eng
        elif eng in FIO_IOENGINES:
            job.fio_ioengine = eng
        else:
            raise FioOptionError(f"ioengine: unknown engine {value!r} (wqs-bench has "
                                 f"{', '.join(IOENGINES)})")
    elif key == "workload":
        w = str(value).strip().lower()
        if w not in ("fio", "prefix"):
            raise FioOptionError(f"workload: expected fio or prefix, got {value!r}")
        job.workload = w
    elif key == "model":
        job.model = str(value).strip()
    elif key in ("block_tokens", "conversations", "system_prompt_tokens"):
        setattr(job, key, parse_int(key, value, 0 if key == "system_prompt_tokens" else 1))
    elif key == "kv_bytes_per_token":
        job.kv_bytes_per_token = parse_size(value, 1024)
    elif key == "kv_dtype":
        job.kv_dtype = str(value).strip().lower()
    elif key in ("redis", "files_dir", "rawsock"):
        setattr(job, key, str(value))
    elif key in IGNORED:
        job.ignored.append(key)
    else:  # pragma: no cover - _split rejects unknown options first
        raise FioOptionError(f"unrecognized option {key!r}")


def _check(job: JobSpec) -> None:
    if job.workload == "fio" and job.ioengine != "null" and not job.size and not job.io_size:
        raise FioOptionError(f"{job.name}: you need to specify size=")
    if job.workload == "fio" and job.ioengine == "null" and not job.size:
        job.size = job.io_size or 1 << 30
    if job.size is not None and job.size < job.slot_size and job.workload == "fio":
        raise FioOptionError(f"{job.name}: size={job.size} is smaller than the block size "
                             f"{job.slot_size}")
    if job.iodepth_batch == 0:
        job.iodepth_batch = job.iodepth  # fio: 0 means "submit everything queued"
    if job.iodepth_batch > job.iodepth:
        job.iodepth_batch = job.iodepth
    if job.kv_dtype not in ("bf16", "fp16", "fp8", "fp32", "int8"):
        raise FioOptionError(f"kv_dtype: expected bf16, fp16, fp8, int8 or fp32, got "
                             f"{job.kv_dtype!r}")


# -------------------------------------------------------------------- the command line


@dataclass
class Invocation:
    cli: dict[str, str] = field(default_factory=dict)  # output, output_format, servers...
    global_options: dict[str, str] = field(default_factory=dict)
    jobs: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # (name, own)
    job_files: list[str] = field(default_factory=list)


def _known(key: str) -> bool:
    return key in JOB_OPTIONS or key in CLI_ONLY or key in IGNORED


def split_argv(argv: list[str]) -> Invocation:
    """fio's command line: globals, then --name=X sections, then job files anywhere."""
    inv = Invocation()
    current: dict[str, str] | None = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h",):
            inv.cli["help"] = "1"
            continue
        if not arg.startswith("--") or arg == "--":
            if arg == "--":
                inv.job_files.extend(argv[i:])
                break
            inv.job_files.append(arg)
            continue
        body = arg[2:]
        key, eq, value = body.partition("=")
        key = canonical(key)
        if not _known(key):
            raise FioOptionError(f"unrecognized option '--{body.split('=')[0]}'")
        if not eq:
            if key in FLAGS:
                value = ""  # a bare flag: on, and (as fio does) not listed in JSON options
            elif i < len(argv) and not argv[i].startswith("--"):
                value = argv[i]
                i += 1
            else:
                raise FioOptionError(f"option '--{key}' needs a value (--{key}=VALUE)")
        if key == "name":
            current = {"name": value}  # fio lists it among the job's options
            inv.jobs.append((value, current))
        elif key in CLI_ONLY:
            inv.cli[key] = value
        elif current is None:
            inv.global_options[key] = value
        else:
            current[key] = value
    return inv


def parse_job_file(text: str, env: dict[str, str] | None = None
                   ) -> list[tuple[str, dict[str, str], dict[str, str]]]:
    """fio job file -> [(name, merged global+own options, own options)] in file order."""
    env = dict(os.environ if env is None else env)
    jobs: list[tuple[str, dict[str, str], dict[str, str]]] = []
    glob: dict[str, str] = {}
    section: str | None = None
    own: dict[str, str] = {}

    def flush() -> None:
        if section is not None and section != "global":
            jobs.append((own.pop("name", section), {**glob, **own}, dict(own)))

    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in ";#":
            continue
        line = re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), line)
        if line.startswith("["):
            if not line.endswith("]"):
                raise FioOptionError(f"line {lineno}: bad section header {raw!r}")
            flush()
            section = line[1:-1].strip()
            own = {}
            continue
        if section is None:
            raise FioOptionError(f"line {lineno}: option outside a section: {raw!r}")
        for sep in (";", "#"):  # trailing comments
            if f" {sep}" in line:
                line = line.split(f" {sep}", 1)[0].strip()
        key, eq, value = line.partition("=")
        key = canonical(key)
        if not _known(key) or key in CLI_ONLY - set(JOB_FILE_CLI):
            raise FioOptionError(f"line {lineno}: unrecognized option {key!r}")
        value = value.strip() if eq else ""  # a bare flag is on
        if section == "global":
            glob[key] = value
        else:
            own[key] = value
    flush()
    return jobs


def build_jobs(inv: Invocation) -> tuple[list[JobSpec], dict[str, str]]:
    """JobSpecs for every job (files first, then --name jobs) and the global options."""
    specs: list[JobSpec] = []
    globals_seen = dict(inv.global_options)
    for path in inv.job_files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise FioOptionError(f"cannot read job file {path}: {e.strerror}") from None
        for name, merged, own in parse_job_file(text):
            for key in JOB_FILE_CLI:  # a job file may name its cluster
                if key in merged:
                    inv.cli.setdefault(key, merged.pop(key))
                    own.pop(key, None)
            merged = {**merged, **inv.global_options, **own}
            specs.append(build_job(name, merged, own))
    for name, own in inv.jobs:
        specs.append(build_job(name, {**inv.global_options, **own}, own))
    if not specs and inv.global_options:
        raise FioOptionError("no jobs defined: give --name=JOB (or a job file)")
    return specs, globals_seen


def assign_groups(specs: list[JobSpec]) -> list[int]:
    """fio's reporting groups: a stonewall or new_group starts the next group."""
    groups, g = [], 0
    for i, s in enumerate(specs):
        if i and (s.stonewall or s.new_group):
            g += 1
        groups.append(g)
    return groups


def describe_bs(job: JobSpec) -> str:
    """fio's job header: ``bs=(R) 4096B-4096B, (W) 4096B-4096B, (T) 4096B-4096B``."""
    r, w = job.bs_range(0), job.bs_range(1)
    return (f"(R) {fmt_bytes(r[0])}-{fmt_bytes(r[1])}, (W) {fmt_bytes(w[0])}-{fmt_bytes(w[1])}, "
            f"(T) {fmt_bytes(r[0])}-{fmt_bytes(r[1])}")


def fmt_bytes(n: int) -> str:
    """fio's block size display: 4096B, 64.0KiB, 1024KiB, 16.0MiB."""
    return num2str(n, 4, 1024, "B")


def num2str(num: float, maxlen: int = 4, thousand: int = 1000, unit: str = "") -> str:
    """fio's num2str: at most `maxlen` digits, scaled by k/M/G (1000) or Ki/Mi/Gi (1024)."""
    prefixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi"] if thousand == 1024 else \
        ["", "k", "M", "G", "T", "P"]
    n = int(num)
    post, modulo, carry = 0, None, False
    while post < len(prefixes):
        if len(str(n)) <= maxlen:
            break
        modulo = n % thousand
        n //= thousand
        carry = modulo >= thousand // 2
        post += 1
    if post >= len(prefixes):
        post = 0
    if modulo is None:
        return f"{n}{prefixes[post]}{unit}"
    room = maxlen - len(str(n))
    if room <= 1:
        return f"{n + (1 if carry else 0)}{prefixes[post]}{unit}"
    frac = f"{modulo / thousand:.{room - 1}f}"
    if frac[0] == "1":
        n += 1
    return f"{n}.{frac[2:]}{prefixes[post]}{unit}"


def option_strings(opts: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in opts.items()}
