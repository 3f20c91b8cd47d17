#!/usr/bin/env python3
"""Run logs as data: the one parser of the logs train_gpt.py writes (logs/<RUN_ID>.txt, rank 0).

    python3 tools/runlog.py logs/<RUN_ID>.txt            # a one-screen summary of what the log holds
    python3 tools/runlog.py logs/<RUN_ID>.txt --json     # every parsed field as JSON

    from runlog import parse_log, read_log               # what every other tool here uses
    log = read_log("logs/x.txt"); log.final_val_bpb, log.settings["SEED"], log.steps[-1].tok_s

A log is a header (settings, versions, git revision, nvidia-smi, the source; it ends at `header:end`),
then one event per line in one form, `name key:value key:value ...` (see train_gpt.py's RUNTIME
section): a few name words, then fields whose values hold no spaces; a line that opens with a field
is named by that field's key. `split_line` is the one function that reads that form; known events
fill typed records: train and validation steps, every scored pass, the artifact accounting, phase
timings, the eval budget, the byte check and the TTT protocol. Unknown events are kept with their fields.

Only the standard library: the tools that read logs run on machines without torch.
"""
import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

FULL_VAL_TARGETS = 40_540_160  # scored targets of the official SP8192 validation split at EVAL_SEQ_LEN 2048
ARTIFACT_LIMIT = 16_000_000    # the challenge's decimal limit on code + compressed model bytes
# Settings that name files or the run rather than change what trains: runs of one configuration differ here.
RUN_SPECIFIC_SETTINGS = ("SEED", "RUN_ID", "LOG_DIR", "ARTIFACT_PATH", "DATA_PATH", "TOKENIZER_PATH",
                         "SAVE_CHECKPOINT", "LOAD_CHECKPOINT", "EVAL_ONLY")

UNITS = re.compile(r"^([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(ms|s|%|MiB|GiB)?$")
STEP = re.compile(r"^step:(\d+)/(\d+)\s")
KEY = re.compile(r"^[A-Za-z_][\w+./-]*$")
HEADER_END = "header:end"
SEED_IN_RUN_ID = re.compile(r"_seed(\d+)$")


def number(text):
    """A logged figure as int or float ("780ms" -> 780, "312.9s" -> 312.9, "29.0%" -> 29.0); None if it is not one."""
    if text is None:
        return None
    m = UNITS.match(str(text).strip())
    if not m:
        return None
    value = float(m.group(1))
    return int(value) if re.fullmatch(r"[-+]?\d+", m.group(1)) else value


@dataclass
class Line:
    """One event line: its kind (the first word, without a trailing colon: `gptq:hessians`, `artifact`,
    `step:12/20`), its name words, its fields, and any word after the fields (none in a regular line)."""
    lineno: int
    text: str
    kind: str
    label: str
    fields: dict
    words: list

    @property
    def name(self) -> str:
        """The label normalised: lower case, '-' and spaces to '_' ("pre-quantization post-ema" -> "pre_quantization_post_ema")."""
        return normalise(self.label)


def settings_items(text: str) -> list:
    """'KEY=VALUE,KEY=VALUE' (the tools' --feature/--combo lists) as [(key, value)]. A value may hold commas
    (GPTQ_MIXED_BITS=5,6): an item without '=' continues the previous value; one with nothing to continue
    comes back as (item, None), for the caller to refuse."""
    items = []
    for item in filter(None, text.split(",")):
        key, eq, value = item.partition("=")
        if not eq and items and items[-1][1] is not None:
            items[-1] = (items[-1][0], items[-1][1] + "," + item)
        else:
            items.append((key, value if eq else None))
    return items


def normalise(label: str) -> str:
    return re.sub(r"[\s\-]+", "_", label.strip().rstrip(":").lower())


def split_line(text: str, lineno: int = 0) -> Line:
    """The one reader of the event form `name key:value ...`. Name words come first and hold no colon
    (`pre-quantization post-ema`); a first word `name:` with nothing after the colon is the name too
    (`artifact: model_bytes:N`). Every other `key:value` word is a field; a line that opens with a field
    is named by its key (`step:12/20 train_loss:...`, `model_params:35944602`). Words after the first
    field that are not fields go to `words`: a regular line has none."""
    tokens = text.split()
    label, fields, words = [], {}, []
    for i, tok in enumerate(tokens):
        key, colon, value = tok.partition(":")
        if colon and KEY.match(key) and (value or (i == 0 and not label)):
            if value:
                fields.setdefault(key, value)
            else:
                label.append(key)
        elif not fields and not colon:
            label.append(tok)
        else:
            words.append(tok)
    kind = tokens[0].rstrip(":") if tokens else ""
    return Line(lineno, text, kind, " ".join(label) or next(iter(fields), ""), fields, words)


@dataclass
class Step:
    step: int
    iterations: int
    train_loss: float
    train_time_ms: float
    step_avg_ms: float | None = None
    tok_s: float | None = None
    mfu: float | None = None
    looping: bool | None = None


@dataclass
class ValPoint:
    step: int
    val_loss: float
    val_bpb: float
    train_time_ms: float | None = None


@dataclass
class Metric:
    """One scored pass: pre_quantization_post_ema, quantized, quantized_sliding_window,
    quantized_ttt_chunk / quantized_ttt_lora, final_ttt; `final` holds only the final val_bpb."""
    name: str
    val_bpb: float
    val_loss: float | None = None
    eval_ms: float | None = None
    scored_targets: int | None = None
    scored_bytes: int | None = None
    fields: dict = field(default_factory=dict)


@dataclass
class RunLog:
    path: str | None = None
    settings: dict = field(default_factory=dict)      # the header, values as logged (strings)
    info: dict = field(default_factory=dict)          # every other `key: value` line (source_sha256, world_size, ...)
    versions: dict = field(default_factory=dict)      # python, torch, cuda, device
    steps: list = field(default_factory=list)         # Step per train_loss line
    val_points: list = field(default_factory=list)    # ValPoint per in-training validation line
    metrics: dict = field(default_factory=dict)       # Metric per scored pass, by name, in log order
    final_val_bpb: float | None = None
    artifact: dict = field(default_factory=dict)      # model_bytes, code_bytes, total, limit, margin, path, code_from
    phases: dict = field(default_factory=dict)        # label -> fields: gptq:hessians, gptq:quantize, serialize, warmup:done, run_phases, ...
    eval_budget: dict = field(default_factory=lambda: {"early": [], "passes": [], "summary": {}})
    eval_total: dict = field(default_factory=dict)    # eval_total_time line: ms, passes
    byte_check: dict | None = None                    # fields, plus ok: bool and skipped: bool
    ttt_protocols: list = field(default_factory=list)  # fields of each ttt:protocol line, plus score_first: bool
    stop: dict = field(default_factory=dict)          # stopping_early line
    quantization_tax: float | None = None
    warnings: list = field(default_factory=list)
    events: list = field(default_factory=list)        # every line after the header as a Line (unknown ones too)
    runs_in_file: int = 0                             # "Hyperparameters:" headers seen; > 1 when a RUN_ID was reused
    failure: list = field(default_factory=list)       # the traceback under a `failure:traceback` line, unindented

    # --- typed figures the tools use -----------------------------------------------------------------

    def find(self, name: str) -> list:
        """Every event whose normalised label is name ("peak memory" finds `peak memory allocated: ...`)."""
        key = normalise(name)
        return [e for e in self.events if e.name == key]

    @property
    def run_id(self) -> str | None:
        return self.settings.get("RUN_ID")

    @property
    def seed(self) -> int | None:
        return number(self.settings.get("SEED"))

    @property
    def eval_only(self) -> bool:
        return bool(self.settings.get("EVAL_ONLY")) or bool(self.find("eval_only"))

    @property
    def world_size(self) -> int | None:
        return number(self.info.get("world_size"))

    @property
    def device(self) -> str | None:
        return self.versions.get("device")

    @property
    def hardware(self) -> str:
        return f"{self.world_size or '?'}x {self.device or 'unknown device'}"

    @property
    def source_sha256(self) -> str | None:
        return self.info.get("source_sha256")

    @property
    def code_bytes(self) -> int | None:
        return number(self.artifact.get("code_bytes"))

    @property
    def model_bytes(self) -> int | None:
        return number(self.artifact.get("model_bytes"))

    @property
    def artifact_bytes(self) -> int | None:
        return number(self.artifact.get("total"))

    @property
    def val_targets(self) -> int | None:
        return number(self.info.get("val_tokens"))

    @property
    def train_ms(self) -> float | None:
        """Training-loop milliseconds (the last step line; the clock pauses while validating)."""
        if self.stop.get("train_time") is not None:
            return number(self.stop["train_time"])
        return self.steps[-1].train_time_ms if self.steps else None

    @property
    def steps_done(self) -> int | None:
        return self.steps[-1].step if self.steps else None

    @property
    def step_avg_ms(self) -> float | None:
        return self.steps[-1].step_avg_ms if self.steps else None

    def phase_rates(self, skip_steps: int = 10, skip_after_switch: int = 0) -> dict:
        """Training speed before and after looping turned on, from the step lines' clocks rather than their
        tok/s fields: {"before_looping" / "looping": {"steps", "ms_per_step", "tokens_per_s"}} for each phase
        with two logged steps. Before looping starts at the first logged step >= skip_steps (the first steps
        run slower); looping at its first logged step + skip_after_switch (tools/bench.py drops one logging
        interval there), so no interval holds the switch. Tokens per step are TRAIN_BATCH_TOKENS (every rank
        and micro-batch together)."""
        tokens = number(self.settings.get("TRAIN_BATCH_TOKENS"))
        timed = [s for s in self.steps if s.train_time_ms is not None and s.looping is not None]
        switch = next((s.step for s in timed if s.looping), None)
        phases = {"before_looping": [s for s in timed if not s.looping and s.step >= skip_steps],
                  "looping": [s for s in timed if s.looping and s.step >= switch + skip_after_switch]}
        rates = {}
        for name, steps in phases.items():
            if len(steps) >= 2 and tokens:
                ms = (steps[-1].train_time_ms - steps[0].train_time_ms) / (steps[-1].step - steps[0].step)
                rates[name] = {"steps": steps[-1].step - steps[0].step, "ms_per_step": ms,
                               "tokens_per_s": tokens / ms * 1000.0}
        return rates

    @property
    def train_calibration_seconds(self) -> float | None:
        """Training plus GPTQ Hessian collection: what the 600 s training budget counts."""
        return number(self.phases.get("gptq:hessians", {}).get("train+calibration"))

    @property
    def final(self) -> Metric | None:
        """The scored pass behind the final val_bpb (it carries val_loss and the scored counts)."""
        if self.final_val_bpb is None:
            return None
        candidates = [m for m in reversed(list(self.metrics.values()))
                      if m.name != "final" and m.val_loss is not None and abs(m.val_bpb - self.final_val_bpb) < 5e-9]
        # the pass's own line (quantized_ttt_chunk) before its summary copy (final_ttt)
        candidates.sort(key=lambda m: m.name.startswith("final"))
        return candidates[0] if candidates else self.metrics.get("final")

    @property
    def final_val_loss(self) -> float | None:
        m = self.final
        return m.val_loss if m else None

    @property
    def scoring_passes(self) -> list:
        """Metrics of the passes on the artifact (quantized, sliding window, TTT): the ones the score comes from."""
        return [m for m in self.metrics.values() if m.name.startswith("quantized") or m.name == "final_ttt"]

    @property
    def eval_seconds(self) -> float | None:
        """Evaluation of the artifact as this run measured it: every pass on the model rebuilt from the
        artifact (the plain round trip, sliding window, TTT with its compile warm-up), which
        `eval_total_time` covers. The pre-quantization pass is a diagnostic of the unquantized model
        and is not counted."""
        total = number(self.eval_total.get("eval_total_time"))
        return None if total is None else total / 1000.0

    @property
    def eval_counted_seconds(self) -> float | None:
        """eval_seconds as the run's EVAL_BUDGET_COUNTS counts them: without the passes' fixed parts (compile
        warm-up, first batch) under `records`, the records' count; all of it under `all`, or when the log
        predates the fields."""
        seconds, summary = self.eval_seconds, self.eval_budget["summary"]
        fixed = number(summary.get("fixed_seconds"))
        if seconds is None or fixed is None or summary.get("counts") != "records":
            return seconds
        return seconds - fixed

    @property
    def estimated_8gpu_eval_seconds(self) -> float | None:
        return number(self.eval_budget["summary"].get("estimated_8gpu_full_val_seconds"))

    @property
    def estimated_8gpu_counted_eval_seconds(self) -> float | None:
        """The 8-GPU estimate as the run's EVAL_BUDGET_COUNTS holds it against the budget (`counted_seconds`:
        under `records`, without the passes' compile warm-ups and first batches, which depend on the inductor's
        cache more than on the configuration); the whole estimate in logs that predate the field."""
        counted = number(self.eval_budget["summary"].get("counted_seconds"))
        return counted if counted is not None else self.estimated_8gpu_eval_seconds

    @property
    def peak_memory_mib(self) -> tuple | None:
        """(allocated, reserved) MiB from `peak_memory allocated_mib:N reserved_mib:N` (CUDA runs)."""
        lines = self.find("peak_memory")
        if not lines or "allocated_mib" not in lines[-1].fields:
            return None
        return number(lines[-1].fields["allocated_mib"]), number(lines[-1].fields.get("reserved_mib"))

    @property
    def mlp_backend(self) -> str | None:
        """Which MLP path ran, when the log says so (`mlp_kernel:cutlass`); None when it does not."""
        for key in ("mlp_backend", "mlp_kernel", "mlp_path", "mlp"):
            if key in self.info:
                return self.info[key]
        return None

    @property
    def uses_cutlass(self) -> bool:
        return "cutlass" in (self.mlp_backend or "").lower()

    @property
    def complete(self) -> bool:
        return self.incomplete_reason is None

    @property
    def incomplete_reason(self) -> str | None:
        """Why the log is not a finished run, or None: no header, a logged failure (its traceback's last line),
        no final val_bpb (stopped or crashed), no artifact."""
        if not self.settings:
            return "it has no settings header"
        if self.failure:
            return f"it failed: {self.failure[-1][:200]}"
        if self.final_val_bpb is None:
            last = self.events[-1].text if self.events else "the header"
            return f"it has no 'final val_bpb' line (the run stopped after: {last[:80]})"
        if not self.eval_only and not self.artifact:
            return "it has no 'artifact:' line"
        return None

    def settings_without_run_specifics(self) -> dict:
        return {k: v for k, v in self.settings.items() if k not in RUN_SPECIFIC_SETTINGS}

    def to_dict(self) -> dict:
        out = asdict(self)
        out["events"] = len(self.events)
        out.update(seed=self.seed, final_val_loss=self.final_val_loss, train_calibration_seconds=self.train_calibration_seconds,
                   eval_seconds=self.eval_seconds, complete=self.complete, incomplete_reason=self.incomplete_reason)
        return out


# --- parsing ---------------------------------------------------------------------------------------------

def parse_log(text: str, path=None) -> RunLog:
    """A RunLog from the text of a log (or of train_gpt.py's stdout, which carries the same lines)."""
    lines = text.splitlines()
    headers = [i for i, x in enumerate(lines) if x.strip() == "Hyperparameters:"]
    log = RunLog(path=str(path) if path is not None else None, runs_in_file=len(headers))
    start = headers[-1] if headers else 0  # a reused RUN_ID appends a second run: the last one is the run
    i = start + 1 if headers else 0
    if headers:
        while i < len(lines) and lines[i].startswith("  "):
            key, _, value = lines[i].strip().partition(":")
            log.settings[key.strip()] = value.strip()
            i += 1
        i = _read_header(log, lines, i)
    for lineno in range(i, len(lines)):
        text_line = lines[lineno].rstrip()
        if text_line.startswith("  "):  # indented: the traceback of a failure:traceback line
            if log.events and log.events[-1].kind == "failure:traceback":
                log.failure.append(text_line[2:])
        elif text_line.strip():
            _read_line(log, split_line(text_line, lineno + 1))
    return log


def _read_header(log: RunLog, lines: list, i: int) -> int:
    """The `key: value` lines after the settings, up to `header:end` (indented blocks, the source and
    nvidia-smi, are skipped). Returns the index of the first event line."""
    end = next((k for k in range(i, len(lines)) if lines[k].strip() == HEADER_END), None)
    if end is None:
        return i  # a log cut inside its header: no events
    for text in lines[i:end]:
        if text.startswith("  ") or not text.strip():
            continue
        key, _, value = text.partition(":")
        if key == "versions":
            log.versions.update(split_line(value).fields)
        elif key == "device":
            log.versions["device"] = value.strip()
        elif key == "world_size":
            log.info.update(split_line(text.replace(": ", ":")).fields)
        else:
            log.info[key] = value.strip()
    return end + 1


def read_log(path) -> RunLog:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return parse_log(path.read_text(encoding="utf-8", errors="replace"), path)


def _read_line(log: RunLog, line: Line):
    log.events.append(line)
    text, f, name, kind = line.text, line.fields, line.name, line.kind
    if kind == "WARNING":
        log.warnings.append(text)
    elif STEP.match(text):
        step, iterations = map(int, STEP.match(text).groups())
        if "train_loss" in f:
            log.steps.append(Step(step, iterations, float(f["train_loss"]), number(f.get("train_time")),
                                  number(f.get("step_avg")), number(f.get("tok/s")), number(f.get("mfu")),
                                  None if "looping" not in f else f["looping"] == "1"))
        elif "val_bpb" in f:
            log.val_points.append(ValPoint(step, number(f.get("val_loss")), number(f["val_bpb"]), number(f.get("train_time"))))
    elif name == "final" and "val_bpb" in f:
        log.final_val_bpb = number(f["val_bpb"])
        log.metrics["final"] = Metric("final", log.final_val_bpb, fields=dict(f))
    elif "val_bpb" in f and kind not in f:
        # every scored pass: pre-quantization post-ema, quantized, quantized_sliding_window, final_ttt, bench_* ...
        log.metrics[name] = Metric(name, number(f["val_bpb"]), number(f.get("val_loss")), number(f.get("eval_time")),
                                   number(f.get("scored_targets")), number(f.get("scored_bytes")), dict(f))
    elif kind == "artifact":
        log.artifact.update(f)
    elif kind == "quantization_tax":
        log.quantization_tax = number(f.get("bpb"))
    elif kind.startswith("eval_budget"):
        sub = kind.partition(":")[2]
        if sub in ("early", "pass"):
            log.eval_budget["passes" if sub == "pass" else "early"].append(dict(f))
        else:
            log.eval_budget["summary"] = dict(f)
    elif kind.startswith("eval_total_time"):
        log.eval_total = dict(f)
    elif kind == "byte_check":
        log.byte_check = dict(f, ok=f.get("status") == "ok", skipped=f.get("status") == "skipped")
    elif kind == "ttt:protocol":
        log.ttt_protocols.append(dict(f, score_first=f.get("rule") == "score-first"))
    elif kind.startswith("stopping_early"):
        log.stop = dict(f, reason=f.get("stopping_early", ""))
    elif kind == "wallclock:budget":
        log.phases[kind] = dict(f, budget=f"{f.get('seconds')}s", gptq_reserve=f"{f.get('gptq_reserve_seconds')}s",
                                training_cap=f"{f.get('training_cap_ms')}ms")
    elif kind.startswith(("gptq:", "serialize", "warmup:", "ttt:", "checkpoint:", "eval_only", "layer_loop:",
                          "run_phases")):
        log.phases[kind] = dict(f)
    elif kind in ("data", "training_data") or kind.partition(":")[0] in f:
        log.info.update(f)  # data train_shards:N val_tokens:N, training_data ... passes:N, model_params:N, mlp_kernel ...


# --- the command line -------------------------------------------------------------------------------------


def summary(log: RunLog) -> str:
    lines = [f"run: {log.run_id}  seed: {log.seed}  {log.hardware}  torch {log.versions.get('torch', '?')}  "
             f"complete: {'yes' if log.complete else 'no (' + log.incomplete_reason + ')'}"]
    if log.steps:
        s = log.steps[-1]
        lines.append(f"train: {s.step} steps, {s.train_time_ms / 1000:.1f}s, last train_loss {s.train_loss:.4f}, "
                     f"{s.tok_s or 0:.0f} tok/s; train+calibration {log.train_calibration_seconds}s"
                     + (f"; {log.info['passes']} passes over its training data" if "passes" in log.info else ""))
    for name, r in log.phase_rates().items():
        lines.append(f"  {name.replace('_', ' ')}: {r['tokens_per_s'] / 1e6:.3f}M tokens/s, {r['ms_per_step']:.1f} ms a step "
                     f"over {r['steps']} steps")
    for m in log.metrics.values():
        extra = "" if m.scored_targets is None else f" scored_targets:{m.scored_targets}"
        lines.append(f"  {m.name:<30} val_bpb:{m.val_bpb:.8f}" + ("" if m.val_loss is None else f" val_loss:{m.val_loss:.8f}")
                     + ("" if m.eval_ms is None else f" eval:{m.eval_ms / 1000:.1f}s") + extra)
    if log.artifact:
        lines.append(f"artifact: {log.model_bytes} model + {log.code_bytes} code = {log.artifact_bytes} bytes")
    if log.eval_seconds is not None:
        lines.append(f"evaluation: {log.eval_seconds:.1f}s measured; 8-GPU full-validation estimate of the passes: "
                     f"{log.estimated_8gpu_eval_seconds}s")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", type=Path, help="run logs (logs/<RUN_ID>.txt)")
    parser.add_argument("--json", action="store_true", help="print every parsed field as JSON")
    args = parser.parse_args(argv)
    for path in args.logs:
        if not path.is_file():
            sys.exit(f"error: log {path} does not exist: give the path of a logs/<RUN_ID>.txt file")
    logs = [read_log(p) for p in args.logs]
    if args.json:
        out = [dict(log.to_dict(), events=None) for log in logs]
        print(json.dumps(out if len(out) > 1 else out[0], indent=2, default=str))
    else:
        print("\n\n".join(summary(log) for log in logs))


if __name__ == "__main__":
    main()
