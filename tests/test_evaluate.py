import numpy as np
import pytest
import torch

from qwen_quant import QwenForCausalLM, QwenTokenizer
from qwen_quant.cli import main
from qwen_quant.evaluate import load_eval_tokens, perplexity
from qwen_quant.synthetic import save_random_checkpoint
from tiny_model import tiny_config


def test_wikitext_local_file_token_count(data_dir, tiktoken_file):
    tokenizer = QwenTokenizer.from_pretrained(tiktoken_file)
    path = data_dir / "wikitext2" / "raw_test_hf_joined" / "wikitext-test.txt"
    tokens = load_eval_tokens(path, tokenizer)
    assert tokens.numel() == 299_078
    direct = tokenizer.encode(path.read_bytes().decode("utf-8").replace("\r\n", "\n"))
    assert tokens.tolist() == direct


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = save_random_checkpoint(tmp_path_factory.mktemp("m"), tiny_config())
    return QwenForCausalLM.from_pretrained(folder)


def test_protocols_agree_and_count_targets(tiny_model):
    tokens = torch.randint(0, 512, (64 * 5 + 10,), generator=torch.Generator().manual_seed(0))
    plain = perplexity(tiny_model, tokens, seqlen=64, progress=False)
    assert plain.windows == 5 and plain.targets == 5 * 63  # the trailing partial window is dropped
    # A hand computation of the same protocol.
    nll = 0.0
    for i in range(5):
        w = tokens[i * 64:(i + 1) * 64][None]
        nll += torch.nn.functional.cross_entropy(tiny_model(w)[0, :-1], w[0, 1:], reduction="sum").item()
    assert plain.nll == pytest.approx(nll / (5 * 63), rel=1e-5)
    batched = perplexity(tiny_model, tokens, seqlen=64, batch_size=3, progress=False)
    assert batched.perplexity == pytest.approx(plain.perplexity, rel=1e-5)
    sliding = perplexity(tiny_model, tokens, seqlen=64, stride=16, progress=False)
    assert sliding.targets == tokens.numel() - 1  # every token after the first is scored exactly once


def test_bad_evaluation_input(tiny_model, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_eval_tokens(tmp_path / "empty.txt", tokenizer=None)
    with pytest.raises(FileNotFoundError, match="neither a file nor a known dataset"):
        load_eval_tokens("wikitext103", tokenizer=None)
    with pytest.raises(ValueError, match="seqlen 4096 is larger than the model's maximum length 512"):
        perplexity(tiny_model, torch.zeros(10000, dtype=torch.long), seqlen=4096, progress=False)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(tiny_model, torch.zeros(10, dtype=torch.long), seqlen=64, progress=False)


def test_cli_eval_with_baseline(stories_dir, tmp_path, capsys):
    np.save(tmp_path / "ids.npy", np.load(stories_dir / "eval_ids.npy")[:256 * 20])
    assert main(["eval", str(stories_dir), "--dataset", str(tmp_path / "ids.npy"), "--seqlen", "256",
                 "--baseline", str(stories_dir)]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "increase: +0.0000 (+0.00 %)" in out


def test_cli_memory_for_a_published_name(capsys):
    assert main(["memory", "Qwen-7B-Chat", "--bits", "4"]) == 0
    out = capsys.readouterr().out
    assert "8.21" in out and "KV cache" in out and "lm_head" in out and "total" in out


def test_cli_unknown_model_is_a_clear_error(capsys):
    assert main(["eval", "Qwen-3B-Chat"]) == 2
    assert "neither a local folder nor a published Qwen model" in capsys.readouterr().err
    assert main(["memory", "not-a-model"]) == 2
