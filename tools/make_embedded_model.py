"""Write the embedded default model: a tiny random-weight GPTBigCode with the real tokenizer.

    python tools/make_embedded_model.py

It stands in until the training recipe ships a trained starchat-nano; its weights are
random, so its text is gibberish, and the model card says so.
"""

from pathlib import Path

import torch

from starchat.config import ModelConfig
from starchat.model.random_checkpoint import write_random_checkpoint

MODEL_DIR = Path(__file__).resolve().parents[1] / "starchat" / "models" / "starchat-nano"

CONFIG = ModelConfig(vocab_size=49156, n_positions=1024, n_embd=64, n_layer=2, n_head=4, n_inner=256,
                     multi_query=True, bos_token_id=0, eos_token_id=0)

if __name__ == "__main__":
    write_random_checkpoint(MODEL_DIR, CONFIG, dtype=torch.float16, seed=1234)  # tokenizer files are already there
    print(f"wrote {MODEL_DIR}")
