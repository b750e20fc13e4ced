"""Measured backend selection: time every option a bundle offers on this machine, cache the table, pick.

    table, note = tuned_table(source, device)          # cached, or measured now (one child process per probe)
    pick = choose(table, "latency")                    # -> Pick(vision row, llm settings, reason) or None

What is measured, on the CPU (GPU devices keep the rule-based order in runtimes.select):
- vision: each vision ONNX precision x thread counts: one encode of a (1, 3, S, S) image, after a warm-up.
- LLM: each GGUF precision x llama.cpp weight repacking (`extra_buffers`) on/off, and per thread count a prefill of
  PROBE_ROWS image rows + PROBE_QUESTION tokens and DECODE_STEPS single-token decodes. llama.cpp runs a batch of
  more than one token on `n_threads_batch` threads and a single token on `n_threads`, so one probe per thread count
  measures both, and the choice combines the best count for each. Then, on the best prefill thread count, the
  prefill of all the model's image rows + the question for each llama.cpp micro-batch size (`n_ubatch`, UBATCHES):
  on a CPU a smaller micro-batch can prefill faster (benchmarks.prefill measures it); the fastest is chosen, and its
  full-length prefill rate is what the first-answer estimate uses. Each timing is the best of REPEATS runs.
Every (precision, repacking) probe runs in a child process (`python -m runtimes.tune_probe`) with a timeout: a crash
(SIGILL from AMX kernels on some VMs) or a hang marks that option unusable instead of killing the caller.

The table is JSON in `$SQLLAVA_EDGE_CACHE/tune/`, keyed by the machine (CPU model, flags, core count), the bundle's
artifacts (their sha256 from the manifest) and the software (sqllava-edge, llama-cpp-python, onnxruntime, numpy,
Python); a table written under any other key, or with another schema, is measured again. So is a table measured while
other programs kept more than BUSY_SHARE of the CPUs busy (sampled from /proc/stat before and after measuring), on
the first load that finds the machine quiet: timings taken under load describe the load, not the machine.

Objectives: "latency" = lowest estimated first-answer time for an image + a short question (vision encode + prefill
of the image rows and question + one decode step); "throughput" = highest decode tokens/s; "memory" = the smallest
artifacts that worked (then the fastest of those). Nothing here is used when tuning is off ($SQLLAVA_EDGE_TUNE=0,
`Assistant.load(tune=False)`) or when a backend, precision, thread count or GPU layers were given explicitly.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TUNE_ENV = "SQLLAVA_EDGE_TUNE"  # "0" / "false" / "off" switches measured selection off
SCHEMA = 2  # of the cached table and of what a probe measures; another value is measured again (bump on change)
PREFERENCES = ("latency", "throughput", "memory")
PROBE_ROWS = 128  # image rows prefilled per probe (at most the model's image tokens): a short prefill
PROBE_QUESTION = 16  # question tokens after the image rows
DECODE_STEPS = 4
# llama.cpp micro-batch sizes probed (n_batch stays the runtime's 512). benchmarks.prefill on bench-1b (2-core AVX-512,
# 4 GGUF types x repacking): 64 and 128 were slower than 256 / 512 for every option, and 256 vs 512 flipped by option.
UBATCHES = (256, 512)
REPEATS = 2  # runs per thread count; the fastest is kept (the one other processes disturbed least)
PROBE_TIMEOUT = 600.0  # seconds per child process
# A table measured while other programs kept more than this share of the CPUs busy describes that load, not the
# machine (on 2 busy cores llama.cpp's spinning threads lose most of their time, so 1 thread "wins"): it is kept
# while the machine stays that busy and measured again on the first load that finds the machine quiet.
BUSY_SHARE = 0.25
BUSY_SAMPLE_S = 0.5  # how long the CPU's busy share is sampled (before and after measuring; on a busy-table load)


def _cpu_ticks(stat: str | os.PathLike) -> tuple[int, int]:
    """(idle, total) jiffies of all CPUs from the first line of /proc/stat (iowait counts as idle, steal as busy)."""
    from runtimes.device_facts import read_proc_stat

    ticks = read_proc_stat(stat)
    if ticks is None:
        raise ValueError(f"{stat} cannot be read or does not start with the cpu line")
    return ticks["idle"], ticks["total"]


def cpu_busy_share(seconds: float = BUSY_SAMPLE_S, stat: str | os.PathLike = "/proc/stat", sleep=time.sleep
                   ) -> float | None:
    """Share of all CPUs that other programs kept busy over `seconds` (this process sleeps meanwhile), from
    /proc/stat; None where that file does not exist (not Linux) or cannot be read."""
    try:
        idle0, total0 = _cpu_ticks(stat)
        sleep(seconds)
        idle1, total1 = _cpu_ticks(stat)
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return max(0.0, min(1.0, 1.0 - (idle1 - idle0) / (total1 - total0)))


def measured_busy(table: dict) -> float | None:
    """The busy share of other programs while `table` was measured, if it was above BUSY_SHARE (else None)."""
    share = table.get("busy_share")
    return share if isinstance(share, (int, float)) and share > BUSY_SHARE else None


def tuning_enabled(argument: bool | None = None) -> bool:
    """The `tune` argument if given, else $SQLLAVA_EDGE_TUNE (default on)."""
    if argument is not None:
        return bool(argument)
    return os.environ.get(TUNE_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def check_prefer(prefer: str) -> str:
    if prefer not in PREFERENCES:
        raise ValueError(f"unknown prefer={prefer!r}; valid: {', '.join(PREFERENCES)}")
    return prefer


# --------------------------------------------------------------------------------------------------------------------
# Keys: what a cached table must match


def thread_counts(cores: int | None = None) -> list[int]:
    """1, half the cores and all of them (distinct, ascending)."""
    if cores is None:
        from runtimes.device_facts import usable_cores

        cores = usable_cores()
    return sorted({1, max(1, cores // 2), cores})


def machine_key(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> dict:
    """CPU model, a hash of its full flag list, and the cores this process may use."""
    from runtimes.device_facts import cpu_flags, flags_sha256, read_cpuinfo

    fields = read_cpuinfo(cpuinfo)
    model = fields.get("model name") or platform.processor() or platform.machine()
    return {"cpu": model, "flags_sha256": flags_sha256(cpu_flags(fields)), "cores": thread_counts()[-1]}


def software_key() -> dict:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for dist in ("sqllava-edge", "llama-cpp-python", "onnxruntime", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    from sqllava_edge.version import __version__

    versions["sqllava-edge"] = versions["sqllava-edge"] or __version__
    return versions


def bundle_key(manifest) -> str:
    """sha256 over the manifest's digests of the artifacts that are measured."""
    digest = hashlib.sha256()
    for artifact in sorted(manifest.find_all("vision_onnx") + manifest.find_all("llm_gguf"), key=lambda a: a.path):
        digest.update(json.dumps([artifact.path, artifact.precision, artifact.sha256], sort_keys=True).encode())
    return digest.hexdigest()


def table_keys(source) -> dict:
    return {"machine": machine_key(), "software": software_key(), "bundle": bundle_key(source.manifest)}


# --------------------------------------------------------------------------------------------------------------------
# The table and its cache file

VISION_FIELDS = {"precision": str, "bytes": int, "ok": bool, "error": (str, type(None)), "runs": list}
LLM_FIELDS = {"precision": str, "bytes": int, "extra_buffers": bool, "ok": bool, "error": (str, type(None)),
              "runs": list, "ubatch_runs": list}
VISION_RUN = {"n_threads": int, "encode_s": float}
LLM_RUN = {"n_threads": int, "prefill_tok_s": float, "decode_tok_s": float}
UBATCH_RUN = {"n_ubatch": int, "n_threads": int, "prefill_tok_s": float}


def check_table(data) -> dict:
    """Raise ValueError naming the first field that does not follow the schema; return the table."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"not a schema-{SCHEMA} tuning table")
    for key, kind in (("machine", dict), ("software", dict), ("bundle", str), ("created", str), ("probe", dict),
                      ("vision", list), ("llm", list)):
        if not isinstance(data.get(key), kind):
            raise ValueError(f"tuning table: {key!r} must be a {kind.__name__}")
    share = data.get("busy_share")  # optional: None or absent = not known
    if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1):
        raise ValueError(f"tuning table: 'busy_share' must be a number in [0, 1] or null, got {share!r}")
    for part, fields, run_fields in (("vision", VISION_FIELDS, VISION_RUN), ("llm", LLM_FIELDS, LLM_RUN)):
        for row in data[part]:
            for name, kind in fields.items():
                if not isinstance(row.get(name), kind):
                    raise ValueError(f"tuning table: {part} row {row!r} has a bad {name!r}")
            for runs, schema in ((row["runs"], run_fields), (row.get("ubatch_runs", []), UBATCH_RUN)):
                for run in runs:
                    for name, kind in schema.items():
                        if not isinstance(run.get(name), (kind, int) if kind is float else kind):
                            raise ValueError(f"tuning table: {part} run {run!r} has a bad {name!r}")
    return data


def cache_path(keys: dict) -> Path:
    from sqllava_edge.vocab import cache_root

    machine = hashlib.sha256(json.dumps(keys["machine"], sort_keys=True).encode()).hexdigest()[:8]
    return cache_root() / "tune" / f"{keys['bundle'][:24]}-{machine}.json"  # machines sharing a home keep their own


def read_cached(keys: dict) -> tuple[dict | None, str]:
    """(table, "") if the cache file holds a valid table with exactly these keys, else (None, why it is not used)."""
    path = cache_path(keys)
    if not path.is_file():
        return None, "no tuning table for this bundle yet"
    try:
        table = check_table(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        return None, f"the cached tuning table {path} is unreadable ({exc})"
    for name in ("machine", "software", "bundle"):
        if table[name] != keys[name]:
            return None, f"the cached tuning table {path} was measured with another {name}"
    return table, ""


def write_table(table: dict) -> Path:
    from sqllava_edge.fileutil import atomic_write

    check_table(table)
    path = cache_path(table)
    with atomic_write(path, "w") as handle:
        json.dump(table, handle, indent=1)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Measuring (each probe in a child process)


def run_probe(spec: dict, timeout: float = PROBE_TIMEOUT) -> dict:
    """Run one probe in a child process -> {"ok": True, "runs": [...]} or {"ok": False, "error": why}."""
    return run_child([sys.executable, "-m", "runtimes.tune_probe", json.dumps(spec)], timeout)


def run_child(command: list[str], timeout: float) -> dict:
    """Run a probe command; its last stdout line is a JSON object. A signal, exit code or timeout -> ok False."""
    env = {**os.environ, TUNE_ENV: "0"}
    root = str(Path(__file__).resolve().parent.parent)  # this checkout first, as in the parent
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:g} s"}
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        return {"ok": False, "error": f"the probe crashed with {name}"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "error": f"the probe failed (exit code {done.returncode}): {tail}"}
    return {"ok": True, **json.loads(lines[-1])}


def measure(source, threads: list[int] | None = None, timeout: float = PROBE_TIMEOUT, probe=None,
            busy_share=None) -> dict:
    """Probe every vision ONNX precision and every GGUF precision x repacking; -> a table (not yet cached).
    probe(spec, timeout) -> result: run_probe (a child process) unless given. The CPUs' busy share from other
    programs is sampled before and after (busy_share() -> float | None: cpu_busy_share unless given); the table
    keeps the larger."""
    probe = probe or run_probe
    busy_share = busy_share or cpu_busy_share
    config = source.config
    threads = threads or thread_counts()
    rows = min(PROBE_ROWS, config.num_image_tokens)
    visions, ggufs = source.manifest.find_all("vision_onnx"), source.manifest.find_all("llm_gguf")
    total, done = len(visions) + 2 * len(ggufs), 0

    def say(what: str) -> None:  # first loads can take minutes on big GGUFs: show where it is
        print(f"[tune] {done + 1}/{total} {what} ({', '.join(map(str, threads))} threads; once per machine and "
              "bundle, SQLLAVA_EDGE_TUNE=0 skips)", file=sys.stderr, flush=True)

    before = busy_share()
    if before is not None and before > BUSY_SHARE:
        print(f"[tune] other programs keep {before:.0%} of the CPUs busy: the timings will show that load (fewer "
              "threads may win); the table is measured again on a later load that finds the machine quiet, or run "
              "`sqllava-edge tune BUNDLE --force` then", file=sys.stderr, flush=True)
    vision, llm = [], []
    for artifact in visions:
        say(f"vision {artifact.precision}")
        spec = {"kind": "vision", "path": str(source.artifact_path(artifact)), "threads": threads,
                "repeats": REPEATS, "image_size": config.vision.image_size}
        vision.append(_row(artifact, probe(spec, timeout)))
        done += 1
    for artifact in ggufs:
        for extra in (True, False):
            say(f"LLM {artifact.precision}, weight repacking {'on' if extra else 'off'}")
            spec = {"kind": "llm", "path": str(source.artifact_path(artifact)), "threads": threads, "rows": rows,
                    "question": PROBE_QUESTION, "decode": DECODE_STEPS, "repeats": REPEATS, "extra_buffers": extra,
                    "exact": artifact.precision == "f32", "ubatches": list(UBATCHES),
                    "ubatch_rows": config.num_image_tokens}
            result = probe(spec, timeout)
            llm.append({**_row(artifact, result), "extra_buffers": extra, "ubatch_runs": result.get("ubatch_runs", [])})
            done += 1
    after = busy_share()
    shares = [x for x in (before, after) if x is not None]
    return {"schema": SCHEMA, **table_keys(source), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "busy_share": round(max(shares), 3) if shares else None,
            "probe": {"image_tokens": config.num_image_tokens, "rows": rows, "question": PROBE_QUESTION,
                      "decode": DECODE_STEPS, "repeats": REPEATS, "threads": threads, "ubatches": list(UBATCHES),
                      "ubatch_rows": config.num_image_tokens},
            "vision": vision, "llm": llm}


def _row(artifact, result: dict) -> dict:
    return {"precision": artifact.precision, "bytes": artifact.size, "ok": bool(result["ok"]),
            "error": result.get("error"), "runs": result.get("runs", [])}


def tuned_table(source, force: bool = False, timeout: float = PROBE_TIMEOUT) -> tuple[dict, str]:
    """(table, how it was obtained): the cached one when its keys match, else measured now and cached."""
    keys = table_keys(source)
    table, why = (None, "re-measure requested") if force else read_cached(keys)
    if table is not None and measured_busy(table) is not None:
        now = cpu_busy_share()
        if now is not None and now <= BUSY_SHARE:
            table, why = None, (f"the cached table was measured while other programs kept "
                                f"{measured_busy(table):.0%} of the CPUs busy; the machine is quiet now ({now:.0%})")
    if table is not None:
        return table, f"tuning table measured {table['created']} ({cache_path(keys)})"
    table = measure(source, timeout=timeout)
    try:
        where = f"table in {write_table(table)}"
    except OSError as exc:
        where = f"not cached: {exc}"
    return table, f"measured now ({why}); {where}"


# --------------------------------------------------------------------------------------------------------------------
# Choosing (pure: tests feed it fake tables)


@dataclass(frozen=True)
class VisionPick:
    precision: str
    n_threads: int
    encode_s: float


@dataclass(frozen=True)
class LLMPick:
    precision: str
    extra_buffers: bool
    n_threads: int  # single-token decode
    n_threads_batch: int  # prefill
    prefill_tok_s: float
    decode_tok_s: float
    n_ubatch: int | None = None  # llama.cpp micro-batch with the fastest prefill; None: not measured (n_batch)


@dataclass(frozen=True)
class Pick:
    vision: VisionPick | None  # None: no vision option worked (the rule-based choice stays)
    llm: LLMPick | None
    vision_reason: str
    llm_reason: str


def vision_options(table: dict) -> list[VisionPick]:
    """The fastest thread count of every vision precision that worked."""
    out = []
    for row in table["vision"]:
        if row["ok"] and row["runs"]:
            best = min(row["runs"], key=lambda r: r["encode_s"])
            out.append(VisionPick(row["precision"], best["n_threads"], best["encode_s"]))
    return out


def llm_options(table: dict) -> list[LLMPick]:
    """Every (precision, repacking) that worked, with its best thread count for prefill and for decode, and its
    fastest micro-batch size; the prefill rate is the full-length one of that micro-batch when it was measured."""
    out = []
    for row in table["llm"]:
        if row["ok"] and row["runs"]:
            batch = max(row["runs"], key=lambda r: r["prefill_tok_s"])
            single = max(row["runs"], key=lambda r: r["decode_tok_s"])
            ubatch = max(row.get("ubatch_runs") or [{}], key=lambda r: r.get("prefill_tok_s", 0.0))
            out.append(LLMPick(row["precision"], row["extra_buffers"], single["n_threads"],
                               ubatch.get("n_threads", batch["n_threads"]),
                               ubatch.get("prefill_tok_s", batch["prefill_tok_s"]), single["decode_tok_s"],
                               ubatch.get("n_ubatch")))
    return out


def first_answer_s(table: dict, vision: VisionPick | None, llm: LLMPick) -> float:
    """Estimated time to the first answer token: encode + prefill of all image rows and the question + one decode."""
    probe = table["probe"]
    prefill = (probe["image_tokens"] + probe["question"]) / llm.prefill_tok_s
    return (vision.encode_s if vision else 0.0) + prefill + 1.0 / llm.decode_tok_s


def choose(table: dict, prefer: str = "latency", allowed=None, vision_allowed=None) -> Pick:
    """The best measured option for `prefer`. allowed(precision) -> bool drops GGUFs (e.g. that would not fit or are
    below the quality floor, runtimes.quality); vision_allowed(precision) -> bool drops vision precisions."""
    check_prefer(prefer)
    sizes = {("vision", r["precision"]): r["bytes"] for r in table["vision"]}
    sizes.update({("llm", r["precision"]): r["bytes"] for r in table["llm"]})
    visions = [v for v in vision_options(table) if vision_allowed is None or vision_allowed(v.precision)]
    llms = [o for o in llm_options(table) if allowed is None or allowed(o.precision)]
    failed = _failures(table)
    vision = llm = None
    vision_reason = llm_reason = ""
    if visions:
        if prefer == "memory":
            vision = min(visions, key=lambda v: (sizes["vision", v.precision], v.encode_s))
        else:
            vision = min(visions, key=lambda v: v.encode_s)
        others = ", ".join(f"{v.precision} {v.encode_s * 1e3:.1f} ms" for v in visions if v is not vision)
        vision_reason = (f"measured ({prefer}): {vision.precision} encodes in {vision.encode_s * 1e3:.1f} ms on "
                         f"{_threads(vision.n_threads)}" + (f"; others: {others}" if others else "") + failed["vision"])
    else:
        vision_reason = "no vision option was measured to work" + failed["vision"]
    if llms:
        def latency(o: LLMPick) -> float:
            return first_answer_s(table, vision, o)

        if prefer == "latency":
            llm = min(llms, key=latency)
        elif prefer == "throughput":
            llm = max(llms, key=lambda o: o.decode_tok_s)
        else:
            llm = min(llms, key=lambda o: (sizes["llm", o.precision], latency(o)))
        others = "; ".join(f"{_llm_name(o)} {_llm_numbers(table, vision, o)}" for o in llms if o is not llm)
        llm_reason = (f"measured ({prefer}): {_llm_name(llm)}, n_threads {llm.n_threads} / n_threads_batch "
                      f"{llm.n_threads_batch}{_ubatch(llm)}: {_llm_numbers(table, vision, llm)}"
                      + (f"; others: {others}" if others else "") + failed["llm"])
    else:
        llm_reason = ("no GGUF option was measured to work" + (" within memory and the quality floor" if allowed else "")
                      + failed["llm"])
    return Pick(vision, llm, vision_reason, llm_reason)


def _threads(n: int) -> str:
    return f"{n} thread{'' if n == 1 else 's'}"


def _ubatch(o: LLMPick) -> str:
    return "" if o.n_ubatch is None else f" / n_ubatch {o.n_ubatch}"


def _llm_name(o: LLMPick) -> str:
    return f"{o.precision} repacking {'on' if o.extra_buffers else 'off'}"


def _llm_numbers(table: dict, vision: VisionPick | None, o: LLMPick) -> str:
    return (f"prefill {o.prefill_tok_s:.0f} tok/s, decode {o.decode_tok_s:.1f} tok/s, first answer ~"
            f"{first_answer_s(table, vision, o):.2f} s")


def _failures(table: dict) -> dict[str, str]:
    out = {}
    for part in ("vision", "llm"):
        bad = [f"{r['precision']}{'' if part == 'vision' else ' repacking ' + ('on' if r['extra_buffers'] else 'off')}"
               f": {r['error']}" for r in table[part] if not r["ok"]]
        out[part] = f"; unusable here: {'; '.join(bad)}" if bad else ""
    return out


def format_table(table: dict) -> str:
    """The table as text (sqllava-edge tune)."""
    probe = table["probe"]
    busy = measured_busy(table)
    lines = [f"machine: {table['machine']['cpu']} ({table['machine']['cores']} cores); measured {table['created']}"
             + (f" while other programs kept {busy:.0%} of the CPUs busy (measured again when the machine is quiet)"
                if busy is not None else ""),
             f"probe: vision = one encode; llm = prefill of {probe['rows']} image rows + {probe['question']} question "
             f"tokens, {probe['decode']} decode steps; best of {probe.get('repeats', 1)} per thread count",
             "vision      threads  encode ms"]
    for row in table["vision"]:
        if not row["ok"]:
            lines.append(f"  {row['precision']:<9} unusable: {row['error']}")
        for run in row["runs"]:
            lines.append(f"  {row['precision']:<9} {run['n_threads']:>7}  {run['encode_s'] * 1e3:9.1f}")
    lines.append("llm         repack  threads  prefill tok/s  decode tok/s")
    for row in table["llm"]:
        repack = "on" if row["extra_buffers"] else "off"
        if not row["ok"]:
            lines.append(f"  {row['precision']:<9} {repack:<6}  unusable: {row['error']}")
        for run in row["runs"]:
            lines.append(f"  {row['precision']:<9} {repack:<6} {run['n_threads']:>8}  {run['prefill_tok_s']:13.1f}  "
                         f"{run['decode_tok_s']:12.1f}")
    ubatch_rows = [row for row in table["llm"] if row.get("ubatch_runs")]
    if ubatch_rows:
        lines.append(f"llm micro-batch (prefill of {probe.get('ubatch_rows')} image rows + {probe['question']} tokens)")
        lines.append("            repack  threads  n_ubatch  prefill tok/s")
        for row in ubatch_rows:
            repack = "on" if row["extra_buffers"] else "off"
            for run in row["ubatch_runs"]:
                lines.append(f"  {row['precision']:<9} {repack:<6} {run['n_threads']:>8}  {run['n_ubatch']:>8}  "
                             f"{run['prefill_tok_s']:13.1f}")
    return "\n".join(lines)
