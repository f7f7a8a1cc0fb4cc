"""The shapes model's architecture and training loop, at toy size."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from p2p_widgets import edit
from p2p_widgets.processors import find_places
from p2p_widgets.shapes.model import ModelConfig, build_pipeline
from p2p_widgets.shapes.train import TrainConfig, _images, edge_weights, loss_weights, refine_decoder, train

TOY = ModelConfig(
    image_size=32, vae_channels=(8, 16), unet_channels=(16, 32), heads=2, text_width=16, text_layers=1, text_heads=2
)


def test_the_bundled_architecture_has_cross_attention_at_two_levels():
    pipe = build_pipeline()
    factors = sorted({p.factor for p in find_places(pipe.unet).values() if p.is_cross})
    assert factors == [1, 2, 4]  # 16x16 and 8x8 levels, and the 4x4 mid block
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 16
    caption = "a big red striped circle and a small blue square on a checkered background"
    ids = pipe.tokenizer(caption).input_ids
    assert len(ids) == len(caption.split()) + 2  # every word one token


def reconstruction_error(vae, images):
    with torch.no_grad():
        return torch.nn.functional.mse_loss(vae.decode(vae.encode(images).latent_dist.mean).sample, images).item()


def test_training_runs_saves_and_loads_like_a_hub_model(tmp_path):
    losses = []
    config = TrainConfig(model=TOY, batch_size=8, vae_steps=40, decoder_steps=4, denoiser_steps=3, warmup_steps=1)
    held_out, _ = _images(123456789, 16, TOY.image_size)
    before = reconstruction_error(build_pipeline(TOY, seed=config.seed).vae, held_out)
    trained = train(config, tmp_path, report=lambda stage, step, steps, loss: losses.append((stage, loss)))
    assert reconstruction_error(trained.vae, held_out) < 0.8 * before  # the VAE learns (0.66 -> 0.45 here)
    assert len([1 for stage, _ in losses if stage == "denoiser"]) == 3
    assert len([1 for stage, _ in losses if stage == "decoder"]) == 4
    assert list(tmp_path.glob("unet/*.safetensors")) and list(tmp_path.glob("vae/*.safetensors"))
    assert json.loads((tmp_path / "training.json").read_text())["train_config"]["vae_steps"] == 40

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path)
    assert pipe.vae.config.scaling_factor != 0.18215  # measured from the latents
    result = edit(pipe, "a big red circle on a black background", "a big blue circle on a black background", steps=3)
    assert [image.size for image in result.images] == [(32, 32), (32, 32)]


def test_training_is_reproducible():
    config = TrainConfig(model=TOY, batch_size=2, vae_steps=2, decoder_steps=1, denoiser_steps=2, warmup_steps=1)
    first, second = train(config), train(config)
    for a, b in zip(first.unet.parameters(), second.unet.parameters()):
        assert torch.equal(a, b)


def test_min_snr_weights_only_lower_the_easy_steps():
    alphas = torch.linspace(0.9999, 0.001, 1000)
    weights = loss_weights(alphas, 5.0)
    snr = alphas / (1 - alphas)
    assert torch.equal(weights[snr <= 5], torch.ones(int((snr <= 5).sum())))
    torch.testing.assert_close(weights[snr > 5], 5 / snr[snr > 5])
    assert torch.equal(loss_weights(alphas, None), torch.ones(1000))


def test_checkpoints_save_the_average_and_do_not_change_training(tmp_path):
    config = TrainConfig(
        model=TOY, batch_size=2, vae_steps=2, decoder_steps=1, denoiser_steps=4, warmup_steps=1, ema_decay=0.5
    )
    plain = train(config)
    checkpointed = train(config, tmp_path, checkpoint_every=2)
    for a, b in zip(plain.unet.parameters(), checkpointed.unet.parameters()):
        assert torch.equal(a, b)
    saved = StableDiffusionPipeline.from_pretrained(tmp_path / "checkpoint-2")
    assert not all(torch.equal(a, b) for a, b in zip(saved.unet.parameters(), plain.unet.parameters()))
    assert not (tmp_path / "checkpoint-4").exists()  # the last step is the model itself


def test_the_saved_weights_are_the_moving_average():
    raw = train(
        TrainConfig(
            model=TOY, batch_size=2, vae_steps=2, decoder_steps=1, denoiser_steps=3, warmup_steps=1, ema_decay=None
        )
    )
    averaged = train(
        TrainConfig(
            model=TOY, batch_size=2, vae_steps=2, decoder_steps=1, denoiser_steps=3, warmup_steps=1, ema_decay=0.999
        )
    )
    # same data and steps; only what is kept differs (the average lags the last step)
    assert not all(torch.equal(a, b) for a, b in zip(raw.unet.parameters(), averaged.unet.parameters()))


def test_a_vae_can_be_reused_from_a_saved_model(tmp_path):
    config = TrainConfig(model=TOY, batch_size=2, vae_steps=5, decoder_steps=2, denoiser_steps=1, warmup_steps=1)
    first = train(config, tmp_path / "first")
    again = train(
        TrainConfig(model=TOY, batch_size=2, vae_steps=0, decoder_steps=0, denoiser_steps=1, warmup_steps=1, seed=1),
        vae_from=tmp_path / "first",
    )
    for a, b in zip(first.vae.parameters(), again.vae.parameters()):
        assert torch.equal(a, b)
    assert again.vae.config.scaling_factor == first.vae.config.scaling_factor


def test_edge_weights_favour_edges_and_keep_the_mean():
    images = -torch.ones(2, 3, 16, 16)
    images[0, 0, 4:12, 4:12] = 1.0  # a red square on black; the second image is flat
    weights = edge_weights(images, 4.0)
    assert weights.shape == (2, 1, 16, 16)
    assert torch.allclose(weights.mean(), torch.tensor(1.0))
    assert weights[0, 0, 4, 8] > 2 * weights[0, 0, 8, 8]  # the square's border vs its inside
    assert weights[0, 0, 8, 8] == weights[0, 0, 0, 0]  # flat inside == flat outside
    assert torch.equal(edge_weights(images, 0.0), torch.ones(2, 1, 16, 16))
    assert torch.all(weights[1] == weights[1, 0, 0, 0])  # a flat image: no edges, one weight


def test_decoder_refinement_moves_only_the_decoder():
    pipe = build_pipeline(TOY, seed=0)
    pipe.vae.register_to_config(scaling_factor=1.3)
    before = {name: p.detach().clone() for name, p in pipe.vae.named_parameters()}
    refine_decoder(pipe.vae, TrainConfig(model=TOY, batch_size=4, decoder_steps=3, warmup_steps=1))
    after = dict(pipe.vae.named_parameters())
    for name, value in before.items():
        moved = not torch.equal(value, after[name])
        assert moved == name.startswith(("decoder.", "post_quant_conv.")), name
    assert pipe.vae.config.scaling_factor == 1.3  # the latent space is unchanged
    assert all(p.requires_grad for p in pipe.vae.parameters()) and not pipe.vae.training


def test_heads_per_level_are_checked():
    assert ModelConfig().level_heads == (2, 2, 4)
    assert ModelConfig(heads=4).level_heads == (4, 4, 4)
    with pytest.raises(ValueError, match="one per level"):
        ModelConfig(heads=(2, 2))
    with pytest.raises(ValueError, match="do not divide"):
        ModelConfig(heads=(3, 2, 4))
    unet = build_pipeline(ModelConfig(heads=(1, 2, 4))).unet
    assert [b.attentions[0].transformer_blocks[0].attn1.heads for b in unet.down_blocks[:2]] == [1, 2]
