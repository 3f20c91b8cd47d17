"""How long LoRA TTT's compile warm-up takes from a cold inductor cache, and how many graphs it compiles, for a
train_gpt.py of your choice: a tiny model on the CPU, with windows beyond TRAIN_SEQ_LEN (EVAL_SEQ_LEN 160 over
64), the case where a guard on the symbolic window width once compiled a second graph.

    python3 tools/bench_lora_compile.py [DIR_HOLDING_train_gpt.py]     # default: this checkout

Compare two sources with `git show REV:train_gpt.py > /tmp/old/train_gpt.py` and a run on /tmp/old. The CPU
figures rank the sources; the GPU's own warm-up is in each TTT log (`ttt:warmup`, `fixed_seconds`).
"""
import os
import pathlib
import re
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
source = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ROOT).resolve()
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp()  # cold: nothing compiled before
sys.path[:0] = [str(source), str(ROOT / "tests")]

import torch  # noqa: E402

import train_gpt as tg  # noqa: E402
from conftest import build_tiny_dataset  # noqa: E402
from eval_helpers import make, random_model, tables_for, validation  # noqa: E402


def main():
    work = pathlib.Path(tempfile.mkdtemp())
    s, rt = make(build_tiny_dataset(work / "data"), work, EVAL_SEQ_LEN=160, TTT_CHUNK_TOKENS=320,
                 TTT_DOCS_IN_FLIGHT=3)
    sp, tables = tables_for(s)
    val = validation(s, 600)
    model = random_model(s)
    s.compile = True
    stats = torch._dynamo.utils.counters["stats"]
    graphs, t0 = stats["unique_graphs"], time.perf_counter()
    result = tg.evaluate_ttt_lora(model, s, rt, val, tables, sp.bos_id())
    seconds = time.perf_counter() - t0
    warmup = re.findall(r"ttt:warmup data:random_tokens seconds:([\d.]+)", (work / "logs" / "eval.txt").read_text())
    print(f"source:{source / 'train_gpt.py'} graphs:{stats['unique_graphs'] - graphs} "
          f"warmup_seconds:{','.join(warmup)} pass_seconds:{seconds:.1f} loss:{result.loss:.6f}")


if __name__ == "__main__":
    main()
