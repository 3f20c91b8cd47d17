"""Helpers for test_eval.py and test_ttt_legality.py: tiny evaluation settings, models and token streams."""
import math

import numpy as np
import torch

import train_gpt as tg
from conftest import TINY_MODEL

# Small enough that every pass takes a second or two on one CPU core, yet every mechanism is exercised:
# stride < window, several TTT chunks with several steps each (TTT_BATCH_SEQS 3 of 4 sequences leaves a
# step of one sequence), documents longer than the LoRA window.
TINY_EVAL = dict(EVAL_STRIDE="16", EVAL_BATCH_WINDOWS="8", TTT_CHUNK_TOKENS="256", TTT_BATCH_SEQS="3",
                 TTT_CHUNK_SIZE="16", TTT_BATCH_DOCS="4", TTT_LORA_RANK="4", HASH_EMBED_SIZE="97")


def make(tiny_data, tmp_path, **overrides):
    """(Settings, Runtime) of a tiny single-process CPU run; overrides are environment values."""
    env = dict(TINY_MODEL, **TINY_EVAL, DATA_PATH=tiny_data["DATA_PATH"], TOKENIZER_PATH=tiny_data["TOKENIZER_PATH"],
               LOG_DIR=str(tmp_path / "logs"), RUN_ID="eval", OVERWRITE="1")  # helpers build many runtimes in one folder
    env.update({k: str(v) for k, v in overrides.items()})
    s = tg.Settings(environ=env)
    return s, tg.Runtime(s)


def random_model(s, seed: int = 0) -> tg.GPT:
    """A GPT whose every matrix is random (the zero-initialised projections too), so attention and MLPs
    carry context: causality tests on it mean something."""
    torch.manual_seed(seed)
    model = tg.GPT(s)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.size(1)))
    model.looping = s.num_loops > 0
    return model


def tables_for(s):
    sp = tg.load_tokenizer(s.tokenizer_path, s.vocab_size)
    return sp, tg.build_byte_tables(sp, s.vocab_size)


def validation(s, n_targets: int) -> torch.Tensor:
    """The first n_targets + 1 tokens of the tiny validation stream."""
    return tg.load_validation_tokens(s.data_path, s.eval_seq_len)[:n_targets + 1]


def repeated_stream(period: int, n_targets: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """BOS, then one random phrase of `period` tokens repeated: learnable only from the stream itself."""
    rng = np.random.default_rng(seed)
    phrase = rng.integers(4, vocab, size=period)
    body = np.tile(phrase, n_targets // period + 1)[:n_targets]
    return torch.from_numpy(np.concatenate(([1], body)).astype(np.int64))


def losses_fn(model):
    return lambda x, y: model.token_losses(x, y)
