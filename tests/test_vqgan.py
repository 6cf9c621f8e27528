"""VQGAN backend: safe taming checkpoint loading, conversion, the straight-through optimisation."""

import os

import pytest
import torch
import yaml

from generators.vqgan.taming import (FirstStage, TamingConfig, build_first_stage, convert_to_safetensors,
                                          inspect_checkpoint, load_first_stage, load_state_dict)
from generators.vqgan.backend import (VQGANGenerator, VQGANSettings, check_size, clamp_with_grad, load_vqgan,
                              make_lr_schedule, make_optimizer, noise_images, resolve_vqgan,
                              straight_through_quantize)
from guidance import CLIPLoss, Cutouts
from tiny import save_tiny_vqgan, tiny_encoder, tiny_vqgan_config, tiny_vqgan_state


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    return save_tiny_vqgan(tmp_path_factory.mktemp("vq"), seed=0)


@pytest.fixture(scope="module")
def gumbel_dir(tmp_path_factory):
    return save_tiny_vqgan(tmp_path_factory.mktemp("gumbel"), seed=1, gumbel=True)


@pytest.fixture(scope="module")
def model(vq_dir):
    return load_first_stage(vq_dir / "config.yaml", vq_dir / "last.ckpt")


@pytest.fixture(scope="module")
def enc():
    return tiny_encoder(0, image_size=32)


def _gen(model, **kw):
    kw.setdefault("width", 32)
    kw.setdefault("height", 32)
    return VQGANGenerator(VQGANSettings(**kw), model=model)


def _in_codebook(z, codebook):
    """Every cell of ``z [B,D,H,W]`` is exactly one of the code vectors."""
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    return bool((flat[:, None, :] == codebook[None]).all(-1).any(-1).all())


def _loss(enc, prompt="a red circle", n=4, augs=()):
    return CLIPLoss(enc, prompt, cutouts=Cutouts(n, min_fraction=0.6, augmentations=list(augs)))


# -- loading ---------------------------------------------------------------------------------

def test_lightning_checkpoint_loads_with_taming_keys(model, vq_dir):
    state = load_state_dict(vq_dir / "last.ckpt")
    assert not any(k.startswith("loss.") for k in state), "discriminator/LPIPS weights must be dropped"
    reference = {k: v for k, v in tiny_vqgan_state(0).items() if not k.startswith("loss.")}
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)
    assert isinstance(model, FirstStage) and not model.gumbel
    assert model.codebook.shape == (64, 8) and model.downsample == 4
    assert not any(p.requires_grad for p in model.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = model.encode(x)
    assert z.shape == (2, 8, 8, 8)
    # encoded latents are codebook vectors
    assert _in_codebook(z, model.codebook)
    assert model.decode(z).shape == (2, 3, 32, 32)


def test_gumbel_checkpoint_loads(gumbel_dir):
    model = load_first_stage(gumbel_dir / "config.yaml", gumbel_dir / "last.ckpt")
    assert model.gumbel
    assert model.codebook.shape == (64, 8)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    z1, z2 = model.encode(x), model.encode(x)
    assert torch.equal(z1, z2), "Gumbel encoding must be deterministic (argmax, no noise)"
    gen = _gen(model, iterations=2)
    assert gen.generate(None, seed=0).images.shape == (1, 3, 32, 32)


def test_gumbel_decided_by_keys_not_yaml(tmp_path):
    # A Gumbel checkpoint whose YAML claims VQModel still loads as Gumbel.
    save_tiny_vqgan(tmp_path, seed=1, gumbel=True)
    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    cfg["model"]["target"] = "taming.models.vqgan.VQModel"
    del cfg["model"]["params"]["temperature_scheduler_config"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert load_first_stage(tmp_path / "config.yaml", tmp_path / "last.ckpt").gumbel


def test_legacy_non_zip_checkpoint_loads(tmp_path):
    state = tiny_vqgan_state(0)
    torch.save({"state_dict": state, "global_step": 1}, tmp_path / "old.ckpt", _use_new_zipfile_serialization=False)
    loaded = load_state_dict(tmp_path / "old.ckpt")
    assert torch.equal(loaded["quantize.embedding.weight"], state["quantize.embedding.weight"])


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _RunsExec:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_untrusted_pickle_payload_is_not_executed(tmp_path):
    shell, code = tmp_path / "shell-ran", tmp_path / "exec-ran"
    folder = save_tiny_vqgan(tmp_path / "evil", extra={"callbacks": [_RunsShell(shell)], "payload": _RunsExec(code)})
    model = load_first_stage(folder / "config.yaml", folder / "last.ckpt")
    assert not shell.exists() and not code.exists(), "a checkpoint's pickle ran code"
    assert model.codebook.shape == (64, 8)
    info = inspect_checkpoint(folder / "last.ckpt")
    assert not shell.exists() and not code.exists()
    assert "builtins.exec" in info["skipped_globals"]
    assert any(g.endswith(".system") for g in info["skipped_globals"])
    assert "omegaconf.dictconfig.DictConfig" in info["skipped_globals"]
    assert {"state_dict", "hyper_parameters", "global_step"} <= set(info["keys"])


def test_yaml_target_is_never_imported(tmp_path):
    folder = save_tiny_vqgan(tmp_path)
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    cfg["model"]["target"] = "some_module_that_does_not_exist.Model"
    cfg["model"]["params"]["lossconfig"]["target"] = "os.system"
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert load_first_stage(folder / "config.yaml", folder / "last.ckpt").codebook.shape == (64, 8)


def test_safetensors_conversion_round_trips_and_refuses_overwrite(tmp_path, vq_dir, model):
    out = tmp_path / "converted"
    weights = convert_to_safetensors(vq_dir / "last.ckpt", out)
    assert weights == out / "model.safetensors" and (out / "config.yaml").is_file()
    converted = load_state_dict(weights)
    original = load_state_dict(vq_dir / "last.ckpt")
    assert converted.keys() == original.keys()
    assert all(torch.equal(converted[k], original[k]) for k in original)
    reloaded = load_vqgan(out)
    z = model.encode(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert torch.equal(reloaded.decode(z), model.decode(z))
    before = weights.read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        convert_to_safetensors(vq_dir / "last.ckpt", out)
    assert weights.read_bytes() == before
    convert_to_safetensors(vq_dir / "last.ckpt", out, overwrite=True)
    single = convert_to_safetensors(vq_dir / "last.ckpt", tmp_path / "one.safetensors")
    with pytest.raises(FileExistsError):
        convert_to_safetensors(vq_dir / "last.ckpt", single)


def test_convert_cli(tmp_path, vq_dir, capsys):
    from generators.vqgan.taming import main

    assert main(["convert", str(vq_dir / "last.ckpt"), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert main(["convert", str(vq_dir / "last.ckpt"), str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_resolve_local_layouts(tmp_path, vq_dir):
    assert resolve_vqgan(vq_dir) == (vq_dir / "config.yaml", vq_dir / "last.ckpt")
    # taming's logs/NAME/{checkpoints,configs} layout, given the checkpoint file
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "configs").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes((vq_dir / "last.ckpt").read_bytes())
    (tmp_path / "configs" / "model.yaml").write_text((vq_dir / "config.yaml").read_text())
    cfg, weights = resolve_vqgan(tmp_path / "checkpoints" / "last.ckpt")
    assert cfg == tmp_path / "configs" / "model.yaml"
    assert load_vqgan(weights, config=cfg).codebook.shape == (64, 8)


def test_missing_files_give_clear_errors(tmp_path, vq_dir):
    with pytest.raises(FileNotFoundError, match="neither a known model"):
        resolve_vqgan(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no weights"):
        resolve_vqgan(tmp_path / "empty")
    (tmp_path / "noconfig").mkdir()
    (tmp_path / "noconfig" / "last.ckpt").write_bytes((vq_dir / "last.ckpt").read_bytes())
    with pytest.raises(FileNotFoundError, match="no config"):
        resolve_vqgan(tmp_path / "noconfig")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_state_dict(tmp_path / "missing.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="could not read VQGAN checkpoint"):
        load_state_dict(tmp_path / "junk.ckpt")


def test_offline_known_model_names_the_fix(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"pass --vqgan FOLDER"):
        resolve_vqgan("vqgan_imagenet_f16_16384", cache_dir=str(tmp_path))


def test_config_mismatch_and_bad_config(tmp_path, vq_dir):
    cfg = tiny_vqgan_config()
    cfg["model"]["params"]["n_embed"] = 32
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="do not match the config"):
        load_first_stage(tmp_path / "config.yaml", vq_dir / "last.ckpt")
    (tmp_path / "bad.yaml").write_text("model: {params: {embed_dim: 8}}\n")
    with pytest.raises(ValueError, match="ddconfig is missing"):
        TamingConfig.from_yaml(tmp_path / "bad.yaml")


# -- optimisation pieces ---------------------------------------------------------------------

def test_straight_through_gradient_reaches_z(model):
    gen = _gen(model)
    z = gen.initial_latents(torch.Generator().manual_seed(0)) + 0.1 * torch.randn(1, 8, 8, 8)
    z.requires_grad_(True)
    images = gen.render(z)
    assert torch.isfinite(images).all()     # unclamped: objectives clamp, the range loss sees the overshoot
    (images * torch.linspace(0, 1, 32)).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    # forward pass uses the nearest codes: the same image as decoding the snapped latents
    snapped = straight_through_quantize(z.detach(), gen.codebook)
    assert torch.allclose(gen.decode(snapped), gen.decode(z.detach()), atol=1e-5)
    index = torch.cdist(z.detach().permute(0, 2, 3, 1).reshape(-1, 8), gen.codebook).argmin(1)
    nearest = gen.codebook[index].view(1, 8, 8, 8).permute(0, 3, 1, 2)
    assert torch.allclose(snapped, nearest, atol=1e-6)  # z + (z_q - z): z_q up to rounding


def test_clamp_with_grad():
    x = torch.tensor([-0.5, 0.5, 1.5], requires_grad=True)
    y = clamp_with_grad(x, 0.0, 1.0)
    assert torch.equal(y.detach(), torch.tensor([0.0, 0.5, 1.0]))
    y.backward(torch.tensor([1.0, 1.0, 1.0]))          # descent would lower all three
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0]))  # the low one must not go lower
    x.grad = None
    clamp_with_grad(x, 0.0, 1.0).backward(torch.tensor([-1.0, -1.0, -1.0]))  # descent raises all three
    assert torch.equal(x.grad, torch.tensor([-1.0, -1.0, 0.0]))


def test_loss_falls_and_z_stays_in_codebook_range(model, enc):
    gen = _gen(model, iterations=30, learning_rate=0.2)
    latents = []
    result = gen.generate(_loss(enc), seed=0, callback=lambda info: latents.append(info.latents.clone()))
    losses = result.losses
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1e-3
    for z in latents:
        assert (z >= gen.z_min - 1e-6).all() and (z <= gen.z_max + 1e-6).all()
    assert result.images.shape == (1, 3, 32, 32) and result.images.device.type == "cpu"
    assert 0 <= result.images.min() and result.images.max() <= 1
    assert not result.interrupted


def test_seed_reproduces_image_exactly(model, enc):
    def run(seed):
        return _gen(model, iterations=4, num_images=2).generate(_loss(enc, augs=["affine", "jitter"]), seed=seed)

    a, b, c = run(11), run(11), run(12)
    assert torch.equal(a.images, b.images) and a.losses == b.losses
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.images[0], a.images[1]), "each image of a batch starts from its own codes"


def test_memory_layout_is_a_speed_choice_only(model, enc):
    """channels-last (default) and contiguous give the same run; each run sets the shared model's layout."""
    fast = _gen(model, iterations=3).generate(_loss(enc), seed=5)
    plain_gen = _gen(model, iterations=3, channels_last=False)
    assert plain_gen.model.decoder.conv_in.weight.is_contiguous()
    plain = plain_gen.generate(_loss(enc), seed=5)
    torch.testing.assert_close(fast.images, plain.images, rtol=0, atol=1e-4)
    assert _gen(model).model.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_init_noise_and_init_image(model, tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for kind in ("pixels", "gradient"):
        img = noise_images(kind, 2, 32, 32, g)
        assert img.shape == (2, 3, 32, 32) and 0 <= img.min() and img.max() <= 1
        assert not torch.equal(img[0], img[1])
    with pytest.raises(ValueError, match="unknown init_noise"):
        noise_images("plaid", 1, 32, 32, g)
    a = _gen(model, init_noise="gradient").initial_latents(torch.Generator().manual_seed(3))
    b = _gen(model, init_noise="gradient").initial_latents(torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    Image.new("RGB", (50, 40), (200, 30, 30)).save(tmp_path / "init.png")
    gen = _gen(model, init_image=str(tmp_path / "init.png"), iterations=0)
    z = gen.initial_latents(torch.Generator().manual_seed(0))
    red = torch.tensor([200 / 255, 30 / 255, 30 / 255]).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    assert torch.equal(z, gen.encode(red)), "init image is resized to the run size and encoded"
    with pytest.raises(FileNotFoundError, match="init image"):
        _gen(model, init_image=str(tmp_path / "missing.png"))


def test_init_weight_pulls_towards_initial_latents(model, enc):
    def final_distance(weight):
        gen = _gen(model, iterations=12, learning_rate=0.3, init_noise="pixels", init_weight=weight)
        start = gen.initial_latents(torch.Generator().manual_seed(5))
        last = []
        parts = []
        gen.generate(_loss(enc), seed=5, callback=lambda i: (last.append(i.latents.clone()), parts.append(i.parts)))
        return (last[-1] - start).pow(2).mean().item(), parts

    free, free_parts = final_distance(0.0)
    held, held_parts = final_distance(50.0)
    assert "init" not in free_parts[0] and "init" in held_parts[-1]
    assert held < 0.5 * free
    decaying = _gen(model, iterations=10, init_weight=2.0, init_weight_decay=True)
    assert decaying._init_weight(0) == 2.0 and decaying._init_weight(5) == pytest.approx(1.0)


def test_callback_stops_and_ctrl_c_keeps_the_image(model, enc):
    gen = _gen(model, iterations=20)
    stopped = gen.generate(_loss(enc), seed=0, callback=lambda info: info.step < 4)
    assert len(stopped.losses) == 5 and stopped.stopped_at == 4 and not stopped.interrupted

    def interrupt(info):
        if info.step == 2:
            raise KeyboardInterrupt

    result = gen.generate(_loss(enc), seed=0, callback=interrupt)
    assert result.interrupted and len(result.losses) == 3
    assert result.images.shape == (1, 3, 32, 32)


def test_bad_sizes_optimisers_and_schedules(model):
    with pytest.raises(ValueError, match="multiple of 4.*use 28 or 32"):
        _gen(model, width=30)
    with pytest.raises(ValueError, match="height 2 .*use 4"):
        _gen(model, height=2)
    check_size(256, 128, 16)
    with pytest.raises(ValueError, match="use 256 or 272"):
        check_size(260, 256, 16)
    with pytest.raises(ValueError, match="unknown optimizer 'DiffGrad'; choose from Adam, AdamW"):
        _gen(model, optimizer="DiffGrad")
    for name in ("adam", "AdamW", "adagrad", "Adamax", "RAdam", "rmsprop", "SGD"):
        assert isinstance(make_optimizer(name, [torch.zeros(1, requires_grad=True)], 0.1), torch.optim.Optimizer)
    with pytest.raises(ValueError, match="learning rate"):
        make_optimizer("adam", [torch.zeros(1, requires_grad=True)], 0.0)
    with pytest.raises(ValueError, match="unknown lr_schedule"):
        _gen(model, lr_schedule="warp")
    opt = make_optimizer("adam", [torch.zeros(1, requires_grad=True)], 1.0)
    sched = make_lr_schedule("cosine", opt, 10)
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_vqgan_size_checked_before_weights_load(tmp_path):
    folder = save_tiny_vqgan(tmp_path)
    (folder / "last.ckpt").write_bytes(b"corrupt")  # never read: the size is rejected first
    with pytest.raises(ValueError, match="multiple of 4"):
        VQGANGenerator(VQGANSettings(vqgan=str(folder), width=33, height=32))


def test_full_size_imagenet_f16_16384_runs_one_step_at_64px(enc):
    cfg = TamingConfig.from_dict({"model": {"params": {
        "embed_dim": 256, "n_embed": 16384,
        "ddconfig": {"double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3, "out_ch": 3,
                     "ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16],
                     "dropout": 0.0}}}})
    torch.manual_seed(0)
    model = build_first_stage(cfg)
    assert model.downsample == 16 and model.codebook.shape == (16384, 256)
    gen = VQGANGenerator(VQGANSettings(width=64, height=64, iterations=1), model=model)
    seen = []
    result = gen.generate(_loss(enc, n=2), seed=0, callback=lambda info: seen.append(info.latents.clone()))
    assert seen[0].shape == (1, 256, 4, 4)
    assert result.images.shape == (1, 3, 64, 64) and len(result.losses) == 1
    start = gen.initial_latents(torch.Generator().manual_seed(0))
    assert not torch.equal(seen[0], start), "one Adam step moved z"
