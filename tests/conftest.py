import os
import sys

# Tests import the stage modules from the repository root, as the scripts do.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import pytest
import torch


@pytest.fixture(scope="module")
def tiny():
    """A random GPT whose weights are large enough that its next token depends on the whole
    context (at GPT-2's init scale it mostly echoes the last token, which hides KV-cache bugs)."""
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128)).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2)
    return model
