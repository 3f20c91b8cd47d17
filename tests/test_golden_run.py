"""The trainer's numbers may not move when its code is reorganised: a short CPU run (every section:
training with looping and the two-lane tail, EMA, GPTQ, the artifact, the round trip, sliding window
and chunk TTT; then LoRA TTT from the same artifact) must reproduce the figures recorded in
tests/golden/tiny_run.json. Regenerate them only for a change that is meant to alter the numbers:

    python3 tests/test_golden_run.py --record

Float sums are exact only on one platform: the CPU's vector width (AVX2 or AVX-512), the vendor's MKL code
path and the torch build all change the last bits, and a 4-decimal loss can round the other way. So the
figures carry the platform they were recorded on. There every figure must match exactly (the quantized
tensors' hash included); on another platform the figures must agree within PORTABLE_TOLERANCE: about ten times
the differences measured between two CPUs for the same source (train losses 1e-4, scores up to 3.6e-4
relative after TTT, integer streams 3 bytes in 123,043), below what a changed setting or formula moves.
"""
import hashlib
import json
import re
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ROOT, TINY_MODEL, build_tiny_dataset, platform_fingerprint, subprocess_env  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny_run.json"
RUN = dict(TINY_MODEL, ITERATIONS="8", TRAIN_LOG_EVERY="1", SEED="7", EVAL_STRIDE="16", EVAL_BATCH_WINDOWS="8",
           TTT_CHUNK_TOKENS="1024", TTT_BATCH_SEQS="3", TTT_EPOCHS="1", HASH_EMBED_SIZE="97")
LORA = dict(TTT_MODE="lora", SLIDING_WINDOW_ENABLED="0", TTT_CHUNK_SIZE="16", TTT_BATCH_DOCS="4", TTT_LORA_RANK="4")
NUMBER = r"([-+0-9.e]+|nan)"
# Off the recording platform: absolute for the train losses, relative for the scores and the stream bytes.
PORTABLE_TOLERANCE = {"train_losses": 1e-3, "pre_quant_val_loss": 1e-4, "quantized_val_bpb": 1e-3,
                      "final_val_bpb": 3e-3, "lora_final_val_bpb": 1e-3, "int_stream_bytes": 1e-3}


def figures_of(log: str) -> dict:
    """The numbers a refactor must keep, read from a run log's events (after the header, which holds the
    source) by patterns that do not depend on line order."""
    log = log.split("\nheader:end\n")[-1]

    def value(pattern):
        return float(re.search(pattern, log).group(1))
    return {
        "train_losses": [float(v) for v in re.findall(r"train_loss:" + NUMBER, log)],
        "pre_quant_val_loss": value(r"pre-quantization post-ema val_loss:" + NUMBER),
        "quantized_val_bpb": value(r"\nquantized val_loss:\S+ val_bpb:" + NUMBER),
        "final_val_bpb": value(r"final val_bpb:" + NUMBER),
    }


def quantized_tensor_figures(blob: bytes) -> dict:
    """The artifact's quantized tensors, apart from its stored settings: a new setting changes the settings
    header (and so model_bytes and the file's hash) without changing a single weight. The hash covers every
    tensor's values and scales; the byte count is the compressed size of the integer-matrix streams."""
    import train_gpt as tg
    qstate, _ = tg.unpack_artifact(blob, "golden.ptz")
    digest = hashlib.sha256()
    for name in sorted(qstate):
        qt = qstate[name]
        digest.update(name.encode() + qt.kind.encode() + qt.data.contiguous().numpy().tobytes())
        if qt.scale is not None:
            digest.update(qt.scale.contiguous().numpy().tobytes())
    (count,) = struct.unpack_from("<H", blob, 6)
    lengths = struct.unpack_from(f"<{count}I", blob, 8)
    return {"tensors_sha256": digest.hexdigest(), "int_stream_bytes": sum(lengths[1:])}


def run(env: dict, tmp: Path) -> str:
    proc = subprocess.run([sys.executable, "train_gpt.py"], cwd=ROOT, env=subprocess_env(env), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (Path(env["LOG_DIR"]) / f"{env['RUN_ID']}.txt").read_text()


def golden_run(tmp: Path) -> dict:
    data = build_tiny_dataset(tmp / "data")
    paths = dict(DATA_PATH=data["DATA_PATH"], TOKENIZER_PATH=data["TOKENIZER_PATH"], LOG_DIR=str(tmp / "logs"))
    out = figures_of(run(dict(RUN, **paths, RUN_ID="golden"), tmp))
    artifact = tmp / "logs" / "golden.ptz"
    out.update(quantized_tensor_figures(artifact.read_bytes()))
    lora_log = run(dict(RUN, **paths, **LORA, RUN_ID="lora", EVAL_ONLY=str(artifact)), tmp)
    out["lora_final_val_bpb"] = float(re.search(r"final val_bpb:" + NUMBER, lora_log).group(1))
    return out


def compare(now: dict, golden: dict, exact: bool) -> list:
    """The figures that differ beyond what the platform allows, as readable lines (empty when all agree)."""
    problems = []
    if len(now["train_losses"]) != len(golden["train_losses"]):
        return [f"train_losses: {len(now['train_losses'])} logged steps, recorded {len(golden['train_losses'])}"]
    for step, (a, b) in enumerate(zip(now["train_losses"], golden["train_losses"]), start=1):
        if (a != b) if exact else abs(a - b) > PORTABLE_TOLERANCE["train_losses"]:
            problems.append(f"train_loss at step {step}: {a} now, {b} recorded")
    for key in ("pre_quant_val_loss", "quantized_val_bpb", "final_val_bpb", "lora_final_val_bpb", "int_stream_bytes"):
        a, b = now[key], golden[key]
        if (a != pytest.approx(b, rel=1e-9, abs=0)) if exact else abs(a - b) > PORTABLE_TOLERANCE[key] * abs(b):
            problems.append(f"{key}: {a} now, {b} recorded")
    if exact and now["tensors_sha256"] != golden["tensors_sha256"]:
        problems.append("tensors_sha256: the quantized tensors differ from the recorded ones")
    return problems


def test_a_short_run_reproduces_the_recorded_figures(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    exact = golden["platform"] == platform_fingerprint()
    problems = compare(golden_run(tmp_path), golden["figures"], exact)
    where = "on the recording platform (exact)" if exact else "on another platform (PORTABLE_TOLERANCE)"
    assert not problems, f"{where}:\n" + "\n".join(problems)


def test_the_comparison_catches_a_moved_figure():
    """Both comparisons can fail: an exact one on the last digit, the portable one on a change that is
    larger than platform noise (a train loss 0.01 higher, a score 1% higher)."""
    golden = json.loads(GOLDEN.read_text())["figures"]
    assert compare(dict(golden), golden, exact=True) == []
    nudged = dict(golden, train_losses=[golden["train_losses"][0] + 1e-4] + golden["train_losses"][1:])
    assert compare(nudged, golden, exact=True) and not compare(nudged, golden, exact=False)
    moved = dict(golden, train_losses=golden["train_losses"][:-1] + [golden["train_losses"][-1] + 0.01])
    assert compare(moved, golden, exact=False) == [f"train_loss at step 8: {moved['train_losses'][-1]} now, "
                                                    f"{golden['train_losses'][-1]} recorded"]
    assert compare(dict(golden, tensors_sha256="0"), golden, exact=True)
    assert compare(dict(golden, final_val_bpb=golden["final_val_bpb"] * 1.01), golden, exact=False)


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    with tempfile.TemporaryDirectory() as tmp:
        figures = golden_run(Path(tmp))
    recorded = {"platform": platform_fingerprint(), "figures": figures}
    GOLDEN.write_text(json.dumps(recorded, indent=1) + "\n")
    print(json.dumps(recorded, indent=1))
