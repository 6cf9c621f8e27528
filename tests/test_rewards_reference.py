"""Metric mode equals the reference packages' own scores on the same weights and images (to 1e-4).

The reference packages are not dependencies (they pin old transformers/timm or download weights on
import), so these tests run only where they are importable: put them on a path and name it, e.g.

    pip install --target /tmp/rewards-ref --no-deps hpsv2==1.2.0 image-reward==1.5 \\
        simple-aesthetics-predictor==0.1.2 fairscale==0.4.13 clint
    CLIPSTEER_REWARDS_REFERENCE=/tmp/rewards-ref pytest tests/test_rewards_reference.py

The packages' model classes are used as they are. Import-time shims only: ``hpsv2`` ships without
open_clip's BPE file (copied from open_clip), and ``image-reward``'s BLIP imports three helpers
transformers 5 moved or removed (re-exported from ``transformers.pytorch_utils``; the pruning helper,
never called when scoring, is a stub); its ``clip`` import (for another model) is stubbed, its
package ``__init__`` (training code needing ``datasets``) is skipped, and med.py's ``init_weights``
call (which fails before ``post_init`` on transformers 5) is skipped since the test draws the weights;
``invert_attention_mask`` and ``get_head_mask``, dropped from transformers 5's ``PreTrainedModel``, are
put back as transformers 4 defined them.
"""

from __future__ import annotations

import os
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

from tiny_rewards import blip_vision_config, med_config, save_aesthetic, clip_config, write_bert_vocab

REF = os.environ.get("CLIPSTEER_REWARDS_REFERENCE")
pytestmark = pytest.mark.skipif(not REF, reason="set CLIPSTEER_REWARDS_REFERENCE to a folder with hpsv2, image-reward "
                                                "and simple-aesthetics-predictor (see the module docstring)")
CAPTIONS = ["a red circle on a blue background", "a photo of a fox in the snow", "a yellow square"]


@pytest.fixture(scope="module", autouse=True)
def _reference_path():
    if REF and REF not in sys.path:
        sys.path.insert(0, REF)
    yield


def _images(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [(40, 56), (64, 64), (50, 33)]
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())
            for (h, w) in sizes[:n]]


def test_hps_equals_hpsv2(tmp_path):
    import open_clip

    bpe = Path(REF) / "hpsv2" / "src" / "open_clip" / "bpe_simple_vocab_16e6.txt.gz"
    if not bpe.exists():
        shutil.copy(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz", bpe)
    pytest.importorskip("clint")
    from hpsv2.src.open_clip import get_tokenizer, image_transform
    from hpsv2.src.open_clip.model import CLIP as RefCLIP

    from guidance.rewards import load_reward

    cfg = clip_config("ViT-H-14", tiny=True)
    torch.manual_seed(0)
    ref = RefCLIP(**cfg, output_dict=True).eval()
    (tmp_path / "hps").mkdir()
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "hps" / "HPS_v2.1_compressed.pt")
    import json
    (tmp_path / "hps" / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    preprocess_val = image_transform(cfg["vision_cfg"]["image_size"], is_train=False)
    tokenizer = get_tokenizer("ViT-H-14")
    expected = []
    with torch.no_grad():                     # hpsv2.img_score.score, minus autocast (CPU fp32)
        for im, caption in zip(_images(), CAPTIONS):
            outputs = ref(preprocess_val(im).unsqueeze(0), tokenizer([caption]))
            logits = outputs["image_features"] @ outputs["text_features"].T
            expected.append(float(torch.diagonal(logits)[0]))
    ours = load_reward(f"hps:{tmp_path / 'hps'}").score_reference(_images(), CAPTIONS)
    print("hps max |diff|", (ours - torch.tensor(expected, dtype=torch.float64)).abs().max().item())
    assert torch.allclose(ours, torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=0)


def _image_reward_reference():
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu

    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        if not hasattr(mu, name):
            setattr(mu, name, getattr(pu, name))
    if not hasattr(mu, "find_pruneable_heads_and_indices"):
        def _no_pruning(*args, **kwargs):
            raise NotImplementedError("head pruning is not used when scoring")
        mu.find_pruneable_heads_and_indices = _no_pruning
    sys.modules.setdefault("clip", types.ModuleType("clip"))
    pytest.importorskip("fairscale")
    if "ImageReward" not in sys.modules:      # its __init__ imports the training code (datasets, ...)
        package = types.ModuleType("ImageReward")
        package.__path__ = [str(Path(REF) / "ImageReward")]
        sys.modules["ImageReward"] = package
    import ImageReward.ImageReward as ir
    from ImageReward.models.BLIP.med import BertConfig, BertModel
    from ImageReward.models.BLIP.vit import VisionTransformer
    return ir, BertConfig, BertModel, VisionTransformer


def test_imagereward_equals_image_reward_package(tmp_path, monkeypatch):
    import json
    from functools import partial

    from torch import nn

    from guidance.rewards import load_reward
    from guidance.rewards.imagereward import image_reward_tokenizer

    ir, BertConfig, BertModel, VisionTransformer = _image_reward_reference()
    folder = write_bert_vocab(tmp_path / "ir")
    tokenizer = image_reward_tokenizer(str(folder))      # the same calls as ImageReward's init_tokenizer
    vcfg = blip_vision_config(tiny=True)
    med = med_config(len(tokenizer), tiny=True, encoder_width=vcfg.hidden_size)
    (folder / "med_config.json").write_text(json.dumps(med))
    torch.manual_seed(0)
    visual = VisionTransformer(img_size=vcfg.image_size, patch_size=vcfg.patch_size, embed_dim=vcfg.hidden_size,
                               depth=vcfg.num_hidden_layers, num_heads=vcfg.num_attention_heads,
                               mlp_ratio=vcfg.intermediate_size / vcfg.hidden_size, qkv_bias=True,
                               norm_layer=partial(nn.LayerNorm, eps=1e-6), drop_path_rate=0.0)
    bert_cfg = BertConfig.from_json_file(str(folder / "med_config.json"))
    bert_cfg.encoder_width = vcfg.hidden_size
    # transformers 5's init_weights needs post_init() to have run, which med.py's BertModel skips; the
    # weights are drawn below anyway, so its init is skipped (the forward code is untouched).
    monkeypatch.setattr(BertModel, "init_weights", lambda self: None)
    # Two helpers transformers 5 dropped from PreTrainedModel, as transformers 4 defined them.
    if not hasattr(BertModel, "invert_attention_mask"):
        def invert_attention_mask(self, mask):
            ext = (mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]).to(dtype=self.dtype)
            return (1.0 - ext) * torch.finfo(self.dtype).min
        monkeypatch.setattr(BertModel, "invert_attention_mask", invert_attention_mask, raising=False)
    if not hasattr(BertModel, "get_head_mask"):
        monkeypatch.setattr(BertModel, "get_head_mask", lambda self, head_mask, n, **kw: [None] * n, raising=False)
    text = BertModel(config=bert_cfg, add_pooling_layer=False)
    # The reference model object, its own score() code, without its __init__ (which downloads
    # bert-base-uncased and builds the full ViT-L).
    ref = ir.ImageReward.__new__(ir.ImageReward)
    nn.Module.__init__(ref)
    ref.device = "cpu"
    ref.blip = nn.Module()
    ref.blip.visual_encoder, ref.blip.text_encoder, ref.blip.tokenizer = visual, text, tokenizer
    ref.preprocess = ir._transform(vcfg.image_size)
    ref.mlp = ir.MLP(med["hidden_size"])
    ref.mean, ref.std = 0.16717362830052426, 1.0333394966054072
    with torch.no_grad():                     # random weights that let the image matter
        for name, p in ref.named_parameters():
            std = 0.3 if "crossattention" in name else 0.1 if name.startswith("mlp.") else 0.05
            if p.dim() >= 2:
                p.normal_(std=std)
    ref.eval()
    torch.save(ref.state_dict(), folder / "ImageReward.pt")
    expected = torch.tensor([ref.score(c, im) for im, c in zip(_images(), CAPTIONS)], dtype=torch.float64)
    ours = load_reward(f"imagereward:{folder}").score_reference(_images(), CAPTIONS)
    print("imagereward max |diff|", (ours - expected).abs().max().item(), expected.tolist())
    assert expected.std() > 1e-3
    assert torch.allclose(ours, expected, atol=1e-4, rtol=0)


def test_aesthetic_equals_simple_aesthetics_predictor(tmp_path):
    from collections import OrderedDict

    from aesthetics_predictor.v2 import AestheticsPredictorV2Linear

    from guidance.rewards import load_reward
    from guidance.rewards.aesthetic import MLP_FILE

    folder = save_aesthetic(tmp_path / "aes")
    from transformers import CLIPConfig

    config = CLIPConfig.from_pretrained(str(folder))
    config.vision_config.projection_dim = config.projection_dim   # the real config.json carries it there too
    ref = AestheticsPredictorV2Linear.from_pretrained(str(folder), config=config.vision_config).eval()
    state = torch.load(folder / MLP_FILE, weights_only=True)          # as the package's converter does
    ref.layers.load_state_dict(OrderedDict((k.replace("layers.", ""), v) for k, v in state.items()))
    ours = load_reward(f"aesthetic:{folder}")
    pils = _images()
    pixels = ours.reference_pixels(pils)   # the original predictor's OpenAI-CLIP transform, for both
    with torch.no_grad():
        expected = ref(pixel_values=pixels).logits.squeeze(-1).double()
    got = ours.score_reference(pils)
    print("aesthetic max |diff|", (got - expected).abs().max().item())
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)
