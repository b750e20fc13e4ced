"""Stage 0 (training/pretrain_llm.py): the restricted softmax is the exact full one, and the output is a base LLM
that stage 1 accepts."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from training.pretrain_llm import RestrictedHead


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory):
    from sqllava_edge.vocab import vocab_dir
    from training.synthetic import build

    try:
        vocab_dir()
    except RuntimeError as err:
        pytest.skip(f"the Llama-2 vocabulary needs PyPI access once (pip download of llama-cpp-python): {err}")
    out = tmp_path_factory.mktemp("syn0") / "data"
    build(out, n_train=12, n_eval=2, seed=4, image_size=112, max_turns=4)
    return out


def test_restricted_head_equals_full_softmax_of_a_head_with_zero_rows():
    torch.manual_seed(0)
    vocab_size, hidden, vocab = 500, 16, [3, 7, 11, 2, 400, 499]
    weight = torch.zeros(vocab_size, hidden)
    weight[vocab] = torch.randn(len(vocab), hidden)
    h = torch.randn(9, hidden) * 3
    targets = torch.tensor([3, 7, 11, 2, 400, 499, 3, 7, 2])
    full = F.cross_entropy(h @ weight.T, targets, reduction="sum")
    restricted = RestrictedHead(vocab, vocab_size, "cpu").loss_sum(h, weight, targets)
    assert torch.allclose(full, restricted, rtol=1e-5), (full, restricted)
    # and it differs from the naive corpus-only softmax, which would ignore the unseen tokens' mass
    naive = F.cross_entropy(h @ weight[sorted(vocab)].T, torch.tensor([sorted(vocab).index(t) for t in targets]),
                            reduction="sum")
    assert not torch.allclose(naive, restricted)


def test_restricted_head_over_the_whole_vocabulary_has_no_bucket():
    head = RestrictedHead(list(range(10)), 10, "cpu")
    assert head.bucket is None
    h, w = torch.randn(4, 3), torch.randn(10, 3)
    t = torch.tensor([0, 9, 4, 4])
    assert torch.allclose(head.loss_sum(h, w, t), F.cross_entropy(h @ w.T, t, reduction="sum"))
    assert math.isclose(RestrictedHead([1], 10, "cpu").bucket, math.log(9))


def test_pretrain_writes_a_llama_folder_with_zero_unseen_rows(tmp_path, synthetic_data):
    from transformers import LlamaForCausalLM

    from training.pretrain_llm import main

    folder = main(["--data", str(synthetic_data / "stage2.json"), "--out", str(tmp_path / "run"), "--max-steps", "3",
                   "--batch-size", "2", "--no-progress"])
    llm = LlamaForCausalLM.from_pretrained(folder)
    info = json.loads((folder / "pretrain.json").read_text())
    rows = llm.lm_head.weight.abs().sum(dim=1) > 0
    assert int(rows.sum()) == info["corpus_vocab"] < 32000
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["loss"] > 0 for r in records)
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 0
    # stage 1 takes it as its frozen base LLM, referenced (not copied) by the checkpoint
    from sqllava_edge.checkpoint import read_meta
    from training.train import TrainConfig, train

    ckpt = train(TrainConfig(stage=1, data=str(synthetic_data / "stage1.json"), out=str(tmp_path / "s1"),
                             llm_base=str(folder), batch_size=2, max_steps=1, threads=1, progress=False))
    assert str(folder.resolve()) in json.dumps(read_meta(ckpt))
    with pytest.raises(FileExistsError):
        main(["--data", str(synthetic_data / "stage2.json"), "--out", str(tmp_path / "run"), "--max-steps", "1",
              "--no-progress"])
