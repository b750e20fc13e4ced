"""The SQ-LLaVA module against independent implementations: docs/spec.md 1.4.2's literal formulas and transformers' LLaVA."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from sqllava_edge.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, PRESETS, ModelConfig, ProjectorConfig, get_preset
from sqllava_edge.model import PrototypeExtractor, SQLLaVA, build_projector, count_parameters, splice_image_embeddings


def naive_prototypes(m: PrototypeExtractor, x: torch.Tensor) -> torch.Tensor:
    """docs/spec.md 1.4.2 written literally, with the reference's adaptive pooling and dense (B, N, L, D) broadcast."""
    B, L, D = x.shape
    N = m.num_centers
    value = m.v(x).transpose(1, 2)  # (B, D, L)
    feature = m.f(x)  # (B, L, D)
    pool = torch.nn.AdaptiveAvgPool1d(N)
    centers = pool(x.transpose(1, 2)).transpose(1, 2)  # (B, N, D)
    centers_feature = pool(feature.transpose(1, 2)).transpose(1, 2)  # (B, N, D)
    value_hat = F.normalize(value, dim=-1)  # normalised over tokens
    for _ in range(m.iterations):
        c = F.normalize(m.c(centers), dim=-1)
        sim = torch.softmax(c @ value_hat, dim=-2)  # (B, N, L), softmax over centres
        centers = sim @ feature
    cos = F.normalize(centers, dim=-1) @ F.normalize(x, dim=-1).transpose(1, 2)
    sim = torch.sigmoid(m.sim_beta + m.sim_alpha * cos)  # (B, N, L)
    _, idx = sim.max(dim=1, keepdim=True)
    mask = torch.zeros_like(sim).scatter_(1, idx, 1.0)
    sim = sim * mask
    dense = sim.unsqueeze(-1) * feature.unsqueeze(1)  # (B, N, L, D)
    agg = (dense.sum(dim=2) + centers_feature) / (mask.sum(dim=-1, keepdim=True) + 1.0)  # (B, N, D)
    out = (agg.unsqueeze(2) * sim.unsqueeze(-1)).sum(dim=1)  # (B, L, D)
    return m.mlp(out + x)


@pytest.mark.parametrize(
    "tokens,centers,dim,out,batch",
    [(64, 16, 32, 48, 3), (576, 256, 1024, 256, 1)],
    ids=["tiny", "real-shape"],
)
def test_prototype_extractor_matches_literal_formulas(tokens, centers, dim, out, batch):
    torch.manual_seed(0)
    m = PrototypeExtractor(dim, out, centers, tokens, iterations=2).double()
    with torch.no_grad():  # move alpha / beta away from their init so both take part
        m.sim_alpha.fill_(1.7)
        m.sim_beta.fill_(-0.3)
    x = torch.randn(batch, tokens, dim, dtype=torch.float64)
    with torch.no_grad():
        diff = (m(x) - naive_prototypes(m, x)).abs().max().item()
    assert diff <= 1e-5, diff


def test_float64_prototype_extractor_pools_in_float64():
    """A float64 model pools with the float64 matrix (1/3 exactly to float64), however it got there: built in float64,
    or built in float32 and cast with .double() / .to(). The literal formulas then agree to float64 rounding."""
    exact = torch.nn.AdaptiveAvgPool1d(256)(torch.eye(576, dtype=torch.float64)).T  # (N, L): the reference's pooling
    torch.manual_seed(0)
    cast = PrototypeExtractor(64, 48, 256, 576, iterations=2).double()
    torch.set_default_dtype(torch.float64)
    try:
        built = PrototypeExtractor(64, 48, 256, 576, iterations=2)
    finally:
        torch.set_default_dtype(torch.float32)
    for m in (cast, built, cast.float().to(torch.float64)):
        assert m.pool.dtype == torch.float64 and torch.equal(m.pool, exact)
    assert torch.equal(cast.half().pool, exact.half())  # other dtypes: the exact matrix rounded once
    m = PrototypeExtractor(64, 48, 256, 576, iterations=2).double()
    with torch.no_grad():
        m.sim_alpha.fill_(1.7)
        m.sim_beta.fill_(-0.3)
        x = torch.randn(2, 576, 64, dtype=torch.float64)
        diff = (m(x) - naive_prototypes(m, x)).abs().max().item()
    assert diff <= 1e-12, diff


def test_pooling_windows_are_the_specs_three_token_windows():
    from sqllava_edge.model import pooling_matrix

    pool = pooling_matrix(576, 256)
    windows = [torch.nonzero(row).flatten().tolist() for row in pool]
    assert windows[0] == [0, 1, 2] and windows[1] == [2, 3, 4] and windows[4] == [9, 10, 11]
    assert windows[255] == [573, 574, 575]
    assert all(len(w) == 3 for w in windows)


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {root!r})
    from tests.test_model import naive_prototypes
    from sqllava_edge.model import PrototypeExtractor
    torch.set_num_threads(1)
    m = PrototypeExtractor(1024, 1024, 256, 576, 2).eval()
    x = torch.randn(1, 576, 1024)
    def peak_kib():  # VmHWM: this process's own peak RSS (ru_maxrss would include the forking parent's)
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
    before = peak_kib()
    with torch.no_grad():
        y = m(x) if {ours} else naive_prototypes(m, x)
    after = peak_kib()
    print(json.dumps({{"extra_kib": after - before}}))
    """
)


def _extra_peak_mib(ours: bool) -> float:
    import pathlib

    root = str(pathlib.Path(__file__).resolve().parents[1])
    code = _MEMORY_SCRIPT.format(root=root, ours=ours)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_kib"] / 1024


def test_real_shape_forward_memory_far_below_dense_broadcast():
    ours, dense = _extra_peak_mib(True), _extra_peak_mib(False)
    print(f"peak extra memory of one 576x1024 image: ours {ours:.0f} MiB, dense broadcast {dense:.0f} MiB")
    assert dense > 500  # the literal reference materialises (N, L, D) fp32 = 576 MiB
    assert ours < dense / 5


def test_projector_parameter_counts_match_spec_on_meta_device():
    with torch.device("meta"):
        seven = count_parameters(build_projector(PRESETS["sqllava-7b"]))
        thirteen = count_parameters(build_projector(PRESETS["sqllava-13b"]))
        llava = count_parameters(build_projector(PRESETS["llava-1.5-7b"]))
    assert seven == 24_130_562  # docs/spec.md 1.4.1, ln_1 included
    assert thirteen == 34_618_370
    assert llava == 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # mlp2x_gelu


def test_vision_tower_stops_at_selected_layer_and_drops_cls():
    cfg = get_preset("tiny")
    model = SQLLaVA.from_config(cfg, seed=0).eval()
    px = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        ref = model.vision.clip(px, output_hidden_states=True).hidden_states[-2][:, 1:]
        ours = model.vision(px)
    assert ours.shape == (2, cfg.vision.num_patches, cfg.vision.hidden_size)
    assert torch.allclose(ours, ref, atol=1e-6)
    # the last layer never runs: breaking it changes nothing
    with torch.no_grad():
        model.vision.clip.encoder.layers[-1].mlp.fc1.weight.fill_(float("nan"))
        assert torch.equal(model.vision(px), ours)


def test_splice_places_images_pads_right_and_masks_labels():
    hidden = 4
    table = torch.arange(100 * hidden, dtype=torch.float32).view(100, hidden)
    embed = lambda ids: table[ids]  # noqa: E731
    images = torch.full((2, 3, hidden), -1.0)
    images[1] = -2.0
    ids = [torch.tensor([1, 7, IMAGE_TOKEN_INDEX, 8]), torch.tensor([1, IMAGE_TOKEN_INDEX, 9, 10, 11]), torch.tensor([1, 5])]
    labels = [torch.tensor([-100, -100, -100, 8]), torch.tensor([-100, -100, 9, 10, 11]), torch.tensor([-100, 5])]
    out = splice_image_embeddings(ids, embed, images, labels)
    assert out.inputs_embeds.shape == (3, 7, hidden)
    assert out.attention_mask.tolist() == [[1] * 6 + [0], [1] * 7, [1, 1] + [0] * 5]
    assert torch.equal(out.inputs_embeds[0, 2:5], images[0]) and torch.equal(out.inputs_embeds[1, 1:4], images[1])
    assert torch.equal(out.inputs_embeds[0, 5], table[8]) and torch.equal(out.inputs_embeds[2, 1], table[5])
    assert out.labels[0].tolist() == [IGNORE_INDEX] * 5 + [8, IGNORE_INDEX]
    assert out.labels[1].tolist() == [IGNORE_INDEX] * 4 + [9, 10, 11]
    assert (out.inputs_embeds[2, 2:] == 0).all()
    with pytest.raises(ValueError, match="placeholder"):
        splice_image_embeddings(ids, embed, images[:1])


def test_matches_transformers_llava_with_mlp2x_gelu():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from sqllava_edge.model import hf_clip_config, hf_llama_config

    tiny = get_preset("tiny")
    cfg = tiny.replace(projector=ProjectorConfig(type="mlp2x_gelu", keep_unused_ln=False))
    ours = SQLLaVA.from_config(cfg, seed=1).eval()
    image_token = 31999
    hf_cfg = LlavaConfig(
        vision_config=hf_clip_config(cfg.vision).to_dict(),
        text_config=hf_llama_config(cfg.llm).to_dict(),
        image_token_id=image_token,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=cfg.num_image_tokens,
        multimodal_projector_bias=True,
    )
    hf = LlavaForConditionalGeneration(hf_cfg).eval()
    hf.model.vision_tower.load_state_dict(ours.vision.clip.state_dict())
    hf.model.multi_modal_projector.linear_1.load_state_dict(ours.projector[0].state_dict())
    hf.model.multi_modal_projector.linear_2.load_state_dict(ours.projector[2].state_dict())
    hf.model.language_model.load_state_dict(ours.llm.model.state_dict())
    hf.lm_head.load_state_dict(ours.llm.lm_head.state_dict())

    before, after = [1, 319, 13563], [29871, 13, 5618, 338, 445, 29973]
    px = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        ours_logits = ours(torch.tensor(before + [IMAGE_TOKEN_INDEX] + after), pixel_values=px).logits
        hf_ids = torch.tensor([before + [image_token] * cfg.num_image_tokens + after])
        hf_logits = hf(input_ids=hf_ids, pixel_values=px).logits
    assert ours_logits.shape == hf_logits.shape
    assert (ours_logits - hf_logits).abs().max().item() <= 1e-4


def test_config_round_trip_and_errors():
    for name, cfg in PRESETS.items():
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg, name
    with pytest.raises(ValueError, match="valid presets"):
        get_preset("sqllava-70b")
    with pytest.raises(ValueError, match="unknown projector"):
        get_preset("tiny").replace(projector=ProjectorConfig(type="qformer"))
    with pytest.raises(ValueError, match="unknown model config key"):
        ModelConfig.from_dict({**get_preset("tiny").to_dict(), "mm_projector_type": "cluster"})


def test_loss_is_token_mean_over_trained_positions():
    """training.loss.lm_loss (the one training loss) on the spliced batch: summed CE of the trained positions, and
    their number; the mean equals the CE of the full forward's logits there."""
    from training.loss import lm_loss
    from training.modeling import decoder_hidden

    model = SQLLaVA.from_config(get_preset("tiny"), seed=0).eval()
    ids = torch.tensor([1, 450, IMAGE_TOKEN_INDEX, 29871, 13, 1724, 2])
    labels = torch.tensor([IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 1724, 2])
    pixels = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        out = model(ids, pixel_values=pixels)
        batch = model.prepare_inputs(ids, pixels, labels)
        hidden = decoder_hidden(model.llm.model, batch.inputs_embeds, batch.attention_mask)
        loss_sum, count = lm_loss(hidden, batch.labels, model.llm.lm_head)
    logits = out.logits[0]
    n_img = model.config.num_image_tokens
    # positions of tokens 1724 and 2 after the splice, predicted from the position before each
    pos = [len(ids) - 1 + n_img - 2, len(ids) - 1 + n_img - 1]
    manual = F.cross_entropy(logits[[p - 1 for p in pos]], torch.tensor([1724, 2]))
    assert int(count) == 2
    assert torch.allclose(loss_sum / count, manual, atol=1e-5)


def test_checkpoint_base_configs_name_their_architecture(tmp_path):
    """llama.cpp's convert_hf_to_gguf.py (and other tools) read `architectures` from config.json and refuse
    a folder without it ("Failed to detect model architecture")."""
    from sqllava_edge.checkpoint import save_checkpoint

    model = SQLLaVA.from_config(get_preset("tiny"), seed=0)
    folder = save_checkpoint(tmp_path / "ckpt", model)
    for part, architecture in (("llm", "LlamaForCausalLM"), ("vision", "CLIPVisionModel")):
        assert json.loads((folder / part / "config.json").read_text())["architectures"] == [architecture]
