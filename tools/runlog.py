#!/usr/bin/env python3
"""Run logs as data: the one parser of the logs train_gpt.py writes (logs/<RUN_ID>.txt, rank 0).

    python3 tools/runlog.py logs/<RUN_ID>.txt            # a one-screen summary of what the log holds
    python3 tools/runlog.py logs/<RUN_ID>.txt --json     # every parsed field as JSON

    from runlog import parse_log, read_log               # what every other tool here uses
    log = read_log("logs/x.txt"); log.final_val_bpb, log.settings["SEED"], log.steps[-1].tok_s

Every line is split the same way (`split_line`): a leading label, then `key:value`, `key=value` and
`key: value` fields, so a line this module has never seen is kept as an event with its fields, and a
known line whose format is made more regular later (`name key:value key:value`) still parses. Known
lines fill typed records: the settings header, train and validation steps, every scored pass, the
artifact accounting, phase timings, the eval budget, the byte check and the TTT protocol.

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

# A field token: key, then ':' or '=', then a value. Keys may hold '+', '/', '.', '-' (train+calibration, tok/s).
FIELD = re.compile(r"^([A-Za-z_][\w+./-]*)[:=](.+)$")
# Tokens are whitespace-separated, except that a bracketed value with spaces inside stays one token
# (schedule:[0, 1, 2], betas=(0.0,0.999)).
TOKEN = re.compile(r"\S*\[[^\]]*\]\S*|\S*\([^)]*\)\S*|\S+")
UNITS = re.compile(r"^([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(ms|s|%|MiB|GiB)?$")
STEP = re.compile(r"^step:(\d+)/(\d+)\s")
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
    """One log line split into a label (the words before the first field), fields and the other bare words."""
    lineno: int
    text: str
    label: str
    fields: dict
    words: list

    @property
    def name(self) -> str:
        """The label normalised: lower case, '-' and spaces to '_' ("pre-quantization post-ema" -> "pre_quantization_post_ema")."""
        return normalise(self.label)


def normalise(label: str) -> str:
    return re.sub(r"[\s\-]+", "_", label.strip().rstrip(":").lower())


KEY = re.compile(r"^[A-Za-z_][\w+./-]*$")


def split_line(text: str, lineno: int = 0) -> Line:
    """Fields of a line in any of the styles train_gpt.py writes: `key:value`, `key=value`, `key: value`.

    The words before the first field are the label (`pre-quantization post-ema val_loss:...`). A first
    token `word:word` is the label when its value is a word (`gptq:hessians batches:64`) and a field
    when it is a figure (`eval_total_time:1234ms`); `word:` is the label when fields follow it
    (`artifact: model_bytes:N`) and a `key: value` field when a plain value does (`train_shards: 2`)."""
    tokens = TOKEN.findall(text)
    fields, words, label = {}, [], []
    for i, tok in enumerate(tokens):
        if tok is None:  # the value of the `key: value` pair before it
            continue
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if tok.endswith(":") and KEY.match(tok[:-1]):
            if nxt is not None and not FIELD.match(nxt) and not nxt.endswith(":"):
                fields[tok[:-1]] = nxt
                tokens[i + 1] = None
            elif not fields and not words:
                label.append(tok[:-1])
            else:
                words.append(tok)
        elif FIELD.match(tok):
            key, value = FIELD.match(tok).groups()
            if i == 0 and number(value) is None and re.fullmatch(r"[A-Za-z_][\w-]*", value) and not STEP.match(text):
                label.append(tok)  # gptq:hessians, eval_budget:pass, ttt:protocol
            else:
                fields[key] = value
        elif not fields and not words and (i == 0 or label):
            label.append(tok)
        else:
            words.append(tok)
    return Line(lineno, text, " ".join(label), fields, words)


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
    phases: dict = field(default_factory=dict)        # label -> fields: gptq:hessians, gptq:quantize, serialize, warmup:done, ...
    eval_budget: dict = field(default_factory=lambda: {"early": [], "passes": [], "summary": {}})
    eval_total: dict = field(default_factory=dict)    # eval_total_time line: ms, passes
    byte_check: dict | None = None                    # fields, plus ok: bool and skipped: bool
    ttt_protocols: list = field(default_factory=list)  # fields of each ttt:protocol line, plus score_first: bool
    stop: dict = field(default_factory=dict)          # stopping_early line
    quantization_tax: float | None = None
    warnings: list = field(default_factory=list)
    events: list = field(default_factory=list)        # every line after the header as a Line (unknown ones too)
    runs_in_file: int = 0                             # "Hyperparameters:" headers seen; > 1 when a RUN_ID was reused

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
        """Evaluation of the artifact as this run measured it: the quantized roundtrip pass plus every pass
        after it (sliding window, TTT with its compile warm-up). The pre-quantization pass is a diagnostic
        of the unquantized model and is not counted."""
        quantized = self.metrics.get("quantized")
        if quantized is None or quantized.eval_ms is None:
            return None
        passes_ms = number(self.eval_total.get("eval_total_time")) or 0
        return (quantized.eval_ms + passes_ms) / 1000.0

    @property
    def estimated_8gpu_eval_seconds(self) -> float | None:
        return number(self.eval_budget["summary"].get("estimated_8gpu_full_val_seconds"))

    @property
    def peak_memory_mib(self) -> tuple | None:
        """(allocated, reserved) from `peak memory allocated: N MiB reserved: N MiB` (CUDA runs)."""
        lines = self.find("peak memory")
        if not lines or "allocated" not in lines[-1].fields:
            return None
        return number(lines[-1].fields["allocated"]), number(lines[-1].fields.get("reserved"))

    @property
    def mlp_backend(self) -> str | None:
        """Which MLP path ran, when the log says so (`mlp_backend: cutlass_evt`); None when it does not."""
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
        """Why the log is not a finished run, or None: no header, no final val_bpb (stopped or crashed), no artifact."""
        if not self.settings:
            return "it has no settings header"
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
    for lineno in range(i, len(lines)):
        text_line = lines[lineno].rstrip()
        if text_line.strip():
            _read_line(log, split_line(text_line, lineno + 1))
    return log


def read_log(path) -> RunLog:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return parse_log(path.read_text(encoding="utf-8", errors="replace"), path)


def _read_line(log: RunLog, line: Line):
    log.events.append(line)
    text, f, name = line.text, line.fields, line.name
    # What the line is: the label's first word (gptq:hessians, artifact, byte_check), or the first field's key
    # for lines that open with a figure (quantization_tax: +0.0012 bpb, eval_total_time:1234ms).
    head = line.label.split()[0] if line.label else next(iter(f), "")
    if text.startswith("WARNING"):
        log.warnings.append(text)
    elif STEP.match(text):
        step, iterations = map(int, STEP.match(text).groups())
        if "train_loss" in f:
            log.steps.append(Step(step, iterations, float(f["train_loss"]), number(f.get("train_time")),
                                  number(f.get("step_avg")), number(f.get("tok/s")), number(f.get("mfu")),
                                  None if "looping" not in f else f["looping"] == "1"))
        elif "val_bpb" in f:
            log.val_points.append(ValPoint(step, number(f.get("val_loss")), number(f["val_bpb"]), number(f.get("train_time"))))
    elif head == "python":
        # python: X torch: Y cuda: Z device: NAME WITH SPACES
        m = re.match(r"python:\s*(\S+)\s+torch:\s*(\S+)\s+cuda:\s*(\S+)\s+device:\s*(.*)$", text)
        log.versions.update(zip(("python", "torch", "cuda", "device"), m.groups()) if m else f)
    elif name == "final" and "val_bpb" in f:
        log.final_val_bpb = number(f["val_bpb"])
        log.metrics["final"] = Metric("final", log.final_val_bpb, fields=dict(f))
    elif "val_bpb" in f and line.label:
        # every scored pass: pre-quantization post-ema, quantized, quantized_sliding_window, final_ttt, bench_* ...
        log.metrics[name] = Metric(name, number(f["val_bpb"]), number(f.get("val_loss")), number(f.get("eval_time")),
                                   number(f.get("scored_targets")), number(f.get("scored_bytes")), dict(f))
    elif head == "artifact":
        log.artifact.update(f)
    elif head == "quantization_tax":
        log.quantization_tax = number(f.get("quantization_tax", line.words[0] if line.words else None))
    elif head.startswith("eval_budget"):
        kind = head.partition(":")[2]
        if kind in ("early", "pass"):
            log.eval_budget["passes" if kind == "pass" else "early"].append(dict(f))
        else:
            log.eval_budget["summary"] = dict(f)
    elif head.startswith("eval_total_time"):
        log.eval_total = dict(f)
    elif head == "byte_check":
        log.byte_check = dict(f, ok="ok" in line.words, skipped="skipped" in text.split())
    elif head == "ttt:protocol":
        log.ttt_protocols.append(dict(f, score_first="score-first" in text.split()))
    elif head == "stopping_early":
        log.stop = dict(f, reason=f.get("stopping_early") or (line.words[0] if line.words else ""))
    elif head == "wallclock:budget":
        m = re.search(r"budget (\S+) gptq_reserve (\S+) training_cap (\S+)", text)
        log.phases[head] = dict(zip(("budget", "gptq_reserve", "training_cap"), m.groups())) if m else dict(f)
    elif head.startswith(("gptq:", "serialize", "warmup:", "ttt:", "checkpoint:", "eval_only", "layer_loop:")):
        log.phases[head] = dict(f) if f or not line.words else {"value": line.words[0]}
        if head == "gptq:hessians":  # "... train+calibration:312.9s of 313s budget"
            m = re.search(r"of (\S+) budget", text)
            if m:
                log.phases[head]["budget"] = m.group(1)
    elif f and not line.label:
        log.info.update(f)  # key: value lines (source_sha256, world_size, val_tokens, attention_backend, mlp_backend, ...)


# --- the command line -------------------------------------------------------------------------------------


def summary(log: RunLog) -> str:
    lines = [f"run: {log.run_id}  seed: {log.seed}  {log.hardware}  torch {log.versions.get('torch', '?')}  "
             f"complete: {'yes' if log.complete else 'no (' + log.incomplete_reason + ')'}"]
    if log.steps:
        s = log.steps[-1]
        lines.append(f"train: {s.step} steps, {s.train_time_ms / 1000:.1f}s, last train_loss {s.train_loss:.4f}, "
                     f"{s.tok_s or 0:.0f} tok/s; train+calibration {log.train_calibration_seconds}s")
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
