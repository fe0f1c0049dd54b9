import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: a second intra-op thread buys nothing and, on a shared 2-core
    machine, its spin-waits made each small matmul ~40x slower (measured: 32-token generation
    0.35 s with one thread, 15 s with two under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def hf_tokenizer_folder(tmp_path_factory):
    """A folder holding only a trained tokenizer (see _hf_tokenizer.py), trained once per session."""
    pytest.importorskip("transformers")
    from _hf_tokenizer import save_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(folder)
    return folder
