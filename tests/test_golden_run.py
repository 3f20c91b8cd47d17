"""The trainer's numbers may not move when its code is reorganised: a short CPU run (every section:
training with looping and the two-lane tail, EMA, GPTQ, the artifact, the round trip, sliding window
and chunk TTT; then LoRA TTT from the same artifact) must reproduce the figures recorded in
tests/golden/tiny_run.json. Regenerate them only for a change that is meant to alter the numbers:

    python3 tests/test_golden_run.py --record
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
from conftest import ROOT, TINY_MODEL, build_tiny_dataset, subprocess_env  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny_run.json"
RUN = dict(TINY_MODEL, ITERATIONS="8", TRAIN_LOG_EVERY="1", SEED="7", EVAL_STRIDE="16", EVAL_BATCH_WINDOWS="8",
           TTT_CHUNK_TOKENS="1024", TTT_BATCH_SEQS="3", TTT_EPOCHS="1", HASH_EMBED_SIZE="97")
LORA = dict(TTT_MODE="lora", SLIDING_WINDOW_ENABLED="0", TTT_CHUNK_SIZE="16", TTT_BATCH_DOCS="4", TTT_LORA_RANK="4")
NUMBER = r"([-+0-9.e]+|nan)"


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


def test_a_short_run_reproduces_the_recorded_figures(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    now = golden_run(tmp_path)
    assert now["train_losses"] == golden["train_losses"] and len(now["train_losses"]) == 8
    for key in ("pre_quant_val_loss", "quantized_val_bpb", "final_val_bpb", "lora_final_val_bpb"):
        assert now[key] == pytest.approx(golden[key], rel=1e-9, abs=0), key
    assert now["int_stream_bytes"] == golden["int_stream_bytes"]
    assert now["tensors_sha256"] == golden["tensors_sha256"]


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    with tempfile.TemporaryDirectory() as tmp:
        figures = golden_run(Path(tmp))
    GOLDEN.write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures, indent=1))
