"""Shared fixtures: a tiny corpus, tokenizer and shard set the tests build themselves, and the
settings of a model small enough to train on a CPU in seconds."""
import os
import platform
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

TINY_VOCAB = 384

# A small model with every feature of the full one: loops, two-lane tail, XSA, GQA, partial RoPE.
TINY_MODEL = dict(
    VOCAB_SIZE=str(TINY_VOCAB), NUM_LAYERS="6", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2",
    ROPE_DIMS="8", LOOP_START="2", LOOP_END="3", PARALLEL_RESIDUAL_START="4", XSA_LAST_N="6",
    TRAIN_SEQ_LEN="64", EVAL_SEQ_LEN="64", TRAIN_BATCH_TOKENS="2048", VAL_BATCH_TOKENS="4096",
    MAX_WALLCLOCK_SECONDS="0", COMPILE="0", WARMUP_STEPS="0", EMA_DECAY="0.9", VAL_LOSS_EVERY="0",
    # GPTQ on every tiny matrix (the real threshold would ship them all as fp16), calibrated on 2 steps
    PASSTHROUGH_MAX_NUMEL="1024", GPTQ_CALIBRATION_BATCHES="2",
)


def tiny_documents(n_docs: int, seed: int = 0) -> list[str]:
    """Repetitive, learnable English-like documents with a few non-ASCII words."""
    rng = random.Random(seed)
    names = ["Alice", "Bob", "Carol", "Dan", "Émile"]
    verbs = ["likes", "sees", "builds", "reads", "sells"]
    things = ["a red car", "the old book", "café au lait", "three apples", "a naïve plan", "the €5 ticket"]
    docs = []
    for _ in range(n_docs):
        sentences = [f"{rng.choice(names)} {rng.choice(verbs)} {rng.choice(things)} on day {rng.randint(1, 31)}."
                     for _ in range(rng.randint(2, 20))]
        docs.append(" ".join(sentences))
    return docs


def build_tiny_dataset(root: Path, n_docs: int = 1200, n_val_docs: int = 150, vocab: int = TINY_VOCAB) -> dict:
    import sentencepiece as spm
    root.mkdir(parents=True, exist_ok=True)
    docs = tiny_documents(n_docs)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(docs), encoding="utf-8")
    prefix = root / f"tok{vocab}"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=vocab, model_type="bpe", byte_fallback=True,
        split_digits=True, normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, character_coverage=0.999,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, num_threads=1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(prefix) + ".model")
    encoded = [[1] + sp.encode(d) for d in docs]
    data = root / "shards"
    data.mkdir(exist_ok=True)
    val = np.concatenate([np.array(e) for e in encoded[:n_val_docs]])
    train = np.concatenate([np.array(e) for e in encoded[n_val_docs:]])
    tg.write_shard(data / "fineweb_val_000000.bin", val)
    half = len(train) // 2
    tg.write_shard(data / "fineweb_train_000000.bin", train[:half])
    tg.write_shard(data / "fineweb_train_000001.bin", train[half:])
    return {"DATA_PATH": str(data), "TOKENIZER_PATH": str(prefix) + ".model", "docs": docs, "n_val_docs": n_val_docs}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return build_tiny_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def tiny_env(tiny_data, tmp_path):
    """Environment for a tiny run (subprocess or Settings(environ=...)), logging into tmp_path."""
    env = dict(TINY_MODEL, DATA_PATH=tiny_data["DATA_PATH"], TOKENIZER_PATH=tiny_data["TOKENIZER_PATH"],
               LOG_DIR=str(tmp_path / "logs"), RUN_ID="test")
    return env


def subprocess_env(overrides: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(overrides)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def hopper_ptxas(triton):
    """The ptxas Triton itself runs for sm_90 (newer Triton ships a second, newer one for it)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(90).path
    except (ImportError, AttributeError, TypeError):
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def run_in_triton_interpreter(script: str, expected: str, timeout: int = 900):
    """Run script (argv[1] = the repo root) in a fresh process under TRITON_INTERPRET=1 and require `expected`
    in its output; skip where this Triton's interpreter cannot run with this NumPy."""
    proc = subprocess.run([sys.executable, "-c", script, str(ROOT)], env=subprocess_env({"TRITON_INTERPRET": "1"}),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 and "only 0-dimensional arrays can be converted to Python scalars" in proc.stderr:
        pytest.skip("this Triton's interpreter cannot take scalar loop bounds with this NumPy (>= 2.4)")
    assert proc.returncode == 0 and expected in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


def platform_fingerprint() -> dict:
    """What decides the last bits of a CPU run: the torch build, the vector code path torch dispatches to,
    the MKL build and the CPU it chooses its kernels for. The runs themselves use one thread
    (subprocess_env), so the core count does not enter."""
    import torch
    cpu = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("vendor_id", "cpu family", "model", "model name") and key.strip() not in cpu:
                cpu[key.strip()] = value.strip()
    except OSError:
        cpu["processor"] = platform.processor()
    mkl = next((line.strip() for line in torch.__config__.show().splitlines() if "Math Kernel Library" in line), "")
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkl": mkl, "cpu": " / ".join(f"{k}={v}" for k, v in sorted(cpu.items())), "machine": platform.machine()}


def on_the_recording_platform() -> bool:
    """Whether this machine is the one tests/golden/tiny_run.json was recorded on: there float figures
    pinned by the tests reproduce exactly; elsewhere the last bits differ (tests/test_golden_run.py)."""
    import json
    recorded = json.loads((ROOT / "tests" / "golden" / "tiny_run.json").read_text())["platform"]
    return recorded == platform_fingerprint()
