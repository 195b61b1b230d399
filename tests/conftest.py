"""Shared test set-up: offline, single-threaded torch (the CI machine has 2 cores and runs 2 pytest workers)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def char_tokenizer():
    from trl_diffpo.tiny import build_char_tokenizer

    return build_char_tokenizer()


@pytest.fixture
def tiny_model(char_tokenizer):
    from trl_diffpo.tiny import build_tiny_model

    return build_tiny_model(char_tokenizer, architecture="llama", hidden_size=32, num_layers=1)
