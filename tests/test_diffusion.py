"""Diffusion decoders: schedulers, sampling loop, pruned-slot masking, overfitting, mask autoencoder PQ, inpainting."""
import pytest
import torch
import torch.nn.functional as F
from diffusers import DPMSolverMultistepScheduler

from spectraldiffusion.diffusion import (PREDICTION_TYPES, SAMPLERS, MaskAutoencoder, MaskDiffusion, SlotDiffusionDecoder,
                                         bits_to_ids, cross_attention_maps, decode_slots, encode_images, evaluate_masks,
                                         ids_to_bits, make_autoencoder, make_mask_unet, make_sampler, make_scheduler,
                                         make_unet, predict_x0, remove_small_segments, sample_loop, slot_mixture,
                                         swap_slots, train_autoencoder, train_mask_autoencoder, training_target,
                                         unet_forward)
from spectraldiffusion.decoders import overfit


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads(); torch.set_num_threads(1)                      # steadier on a shared 2-core machine
    yield
    torch.set_num_threads(old)


def scheduler_x0(sampler, out, x_t, i):
    t = sampler.timesteps[i]
    if isinstance(sampler, DPMSolverMultistepScheduler):
        fresh = DPMSolverMultistepScheduler.from_config(sampler.config)
        fresh.set_timesteps(len(sampler.timesteps)); fresh.set_begin_index(i)
        fresh.step(out, t, x_t)
        return fresh.model_outputs[-1]
    return sampler.step(out, t, x_t).pred_original_sample


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('kind', SAMPLERS)
@pytest.mark.parametrize('pt', PREDICTION_TYPES)
def test_scheduler_recovers_x0_from_true_noise(pt, kind, dtype):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 5, 5, generator=g, dtype=dtype); noise = torch.randn(x0.shape, generator=g, dtype=dtype)
    train = make_scheduler(pt)
    s = make_sampler(train, kind); s.set_timesteps(20)
    checked = 0
    for i, t in enumerate(s.timesteps.tolist()):
        if pt == 'epsilon' and t == 999: continue                                 # √ᾱ_999 ≈ 5e-5: ill-conditioned
        tt = torch.full((3,), t)
        x_t, out = train.add_noise(x0, noise, tt), training_target(train, x0, noise, tt)
        assert (scheduler_x0(s, out, x_t, i) - x0).abs().max() <= 1e-5, (t, 'scheduler')
        assert (predict_x0(train, x_t, out, tt) - x0).abs().max() <= 1e-5, (t, 'predict_x0')
        checked += 1
    assert checked >= 19


@pytest.mark.parametrize('kind', ['ddim', 'dpm++'])
@pytest.mark.parametrize('pt', PREDICTION_TYPES)
def test_sampling_with_oracle_network_lands_on_the_data_point(pt, kind):
    train = make_scheduler(pt)
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    def oracle(x, t):
        a = train.alphas_cumprod[int(t)].double()
        eps = (x.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()
        return (eps if pt == 'epsilon' else a.sqrt() * eps - (1 - a).sqrt() * x0.double()).float()
    x = sample_loop(oracle, make_sampler(train, kind), x0.shape, steps=10, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(x, x0, atol=1e-4, rtol=0)


def tiny_slot_decoder(prediction_type='epsilon', only_cross_attention=True, cond_drop=0.0, D=16):
    torch.manual_seed(0)
    vae = make_autoencoder((8, 16), norm_num_groups=4, image_size=16)
    unet = make_unet(D, sample_size=8, block_out_channels=(16, 32), only_cross_attention=only_cross_attention)
    return SlotDiffusionDecoder(vae, unet, make_scheduler(prediction_type), cond_drop=cond_drop)


@pytest.mark.parametrize('only_cross_attention', [True, False])
def test_pruned_slots_receive_no_cross_attention(only_cross_attention):
    dec = tiny_slot_decoder(only_cross_attention=only_cross_attention)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([5, 400, 990])
    s = torch.randn(3, 6, 16)
    act = torch.tensor([[True, False, True, False, False, True], [False, True, False, False, False, False], [True] * 6])
    s2 = s.clone(); s2[~act] = 50 * torch.randn(int((~act).sum()), 16)
    with torch.no_grad():
        assert torch.equal(unet_forward(dec.unet, x, t, s, act), unet_forward(dec.unet, x, t, s2, act))
        masks, out = cross_attention_maps(dec.unet, x, t, s, act)
        # dropping the inactive slots altogether gives the same output for an item
        torch.testing.assert_close(unet_forward(dec.unet, x[:1], t[:1], s[:1, act[0]]), out[:1], atol=1e-5, rtol=1e-5)
    assert (masks[~act] == 0).all()
    torch.testing.assert_close(masks.sum(1), torch.ones(3, 8, 8), atol=1e-5, rtol=0)


def test_encoder_attention_mask_alone_leaks_with_only_cross_attention():
    "Documents the diffusers behaviour that `unet_forward` works around."
    dec = tiny_slot_decoder()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 400])
    s = torch.randn(2, 4, 16); act = torch.tensor([[True, False, True, True], [True, True, False, False]])
    s2 = s.clone(); s2[~act] = 50 * torch.randn(int((~act).sum()), 16)
    with torch.no_grad():
        a = dec.unet(x, t, encoder_hidden_states=s, encoder_attention_mask=act.float()).sample
        b = dec.unet(x, t, encoder_hidden_states=s2, encoder_attention_mask=act.float()).sample
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize('kind', SAMPLERS)
def test_fixed_seed_sampling_is_deterministic(kind):
    dec = tiny_slot_decoder(cond_drop=0.2)
    s, act = torch.randn(2, 3, 16), torch.tensor([[True, True, False], [True, False, False]])
    run = lambda seed, w: dec.sample(s, act, steps=5, sampler=kind, guidance=w, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(0, 1.0), run(0, 1.0)) and torch.equal(run(0, 3.0), run(0, 3.0))
    assert not torch.equal(run(0, 1.0), run(1, 1.0))


def test_classifier_free_guidance_combines_two_predictions():
    dec = tiny_slot_decoder()
    with torch.no_grad(): dec.null_slot.normal_()
    s, act = torch.randn(2, 3, 16), torch.tensor([[True, True, False], [True, False, True]])
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 700])
    with torch.no_grad():
        c = unet_forward(dec.unet, x, t, s, act)
        u = unet_forward(dec.unet, x, t, *dec.null(s))
        torch.testing.assert_close(dec.guided(s, act, 3.0)(x, t), u + 3.0 * (c - u), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dec.guided(s, act, 1.0)(x, t), c)


@pytest.mark.parametrize('pt', PREDICTION_TYPES)
def test_overfit_slot_diffusion_decoder(pt):
    dec = tiny_slot_decoder(pt)
    g = torch.Generator().manual_seed(0)
    images, s = torch.rand(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, generator=g)
    with torch.no_grad(): lat = encode_images(dec.vae, images)
    batch = dict(slots=s, latents=lat, t=torch.tensor([50, 300, 600, 900]), noise=torch.randn(lat.shape, generator=g))
    losses = overfit(dec, batch, steps=40, lr=3e-3)
    assert losses[-1] <= 0.5 * losses[0], (losses[0], losses[-1])


def scenes(split, n, size=64):
    from spectraldiffusion.data import BenchmarkDataset, make_loader
    return next(iter(make_loader(BenchmarkDataset('multi_dsprites', split, n=n, image_size=size), batch_size=n)))


def test_overfit_mask_diffusion():
    torch.manual_seed(0)
    d = scenes('train', 4, 32)
    md = MaskDiffusion(MaskAutoencoder(hidden=16), make_mask_unet(sample_size=16, block_out_channels=(16, 32)))
    g = torch.Generator().manual_seed(0)
    batch = dict(images=d['image'], ids=d['instances'], t=torch.tensor([50, 300, 600, 900]), noise=torch.randn(4, 4, 16, 16, generator=g))
    losses = overfit(md, batch, steps=40, lr=3e-3)
    assert losses[-1] <= 0.5 * losses[0], (losses[0], losses[-1])


def test_mask_autoencoder_reconstructs_benchmark_masks():
    from spectraldiffusion.metrics import panoptic_quality
    torch.manual_seed(0)
    tr, te = scenes('train', 256), scenes('test', 64)
    ae = MaskAutoencoder()
    losses = train_mask_autoencoder(ae, tr['instances'], steps=600, crop=32)
    with torch.no_grad(): rec = ae.decode(ae.encode(te['instances']))
    pq = panoptic_quality(rec, te['instances'])['pq']
    assert pq >= 0.95, pq
    with torch.no_grad(): z = ae.encode(tr['instances'][:64])
    assert abs(z.std().item() - 1) < 0.1                                          # latents scaled to unit std


def test_bits_roundtrip_and_small_segments():
    ids = torch.randint(0, 16, (2, 7, 9))
    assert torch.equal(bits_to_ids(ids_to_bits(ids)), ids)
    assert set(ids_to_bits(ids).unique().tolist()) == {-1.0, 1.0}
    ref = ids.clone()
    for b in range(2):
        for v in range(1, 16):
            if 0 < (ids[b] == v).sum() < 5: ref[b][ids[b] == v] = 0
    assert torch.equal(remove_small_segments(ids, 5), ref)


def test_inpainting_keeps_the_known_part():
    torch.manual_seed(0)
    d = scenes('test', 2, 32)
    ae = MaskAutoencoder(hidden=16)
    md = MaskDiffusion(ae, make_mask_unet(sample_size=16, block_out_channels=(16, 32)))
    gen = lambda: torch.Generator().manual_seed(0)
    full = torch.ones_like(d['instances'], dtype=torch.bool)
    with torch.no_grad(): rec = ae.decode(ae.encode(d['instances']))
    for kind in ('ddim', 'dpm++'):
        out = md.sample(d['image'], steps=4, sampler=kind, generator=gen(), known_ids=d['instances'], known=full)
        assert torch.equal(out, rec)
    top = torch.zeros_like(full); top[:, :16] = True
    out = md.sample(d['image'], steps=4, generator=gen(), known_ids=d['instances'], known=top, min_area=0)
    with torch.no_grad(): ref = ae.decode(ae.encode(torch.where(top, d['instances'], 0)), 0)
    assert torch.equal(out[:, :12], ref[:, :12])                                   # away from the border


def test_train_autoencoder_lowers_loss_and_scales_latents():
    torch.manual_seed(0)
    images = scenes('train', 16, 32)['image']
    vae = make_autoencoder((8, 16), norm_num_groups=4, image_size=32)
    losses = train_autoencoder(vae, images, steps=60, batch_size=8, lr=3e-3)
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10]), (losses[:10], losses[-10:])
    with torch.no_grad(): z = encode_images(vae, images)
    assert abs(z.std().item() - 1) < 1e-3


def test_evaluate_masks_reports_pq_and_ceiling():
    torch.manual_seed(0)
    d = scenes('test', 4, 32)
    md = MaskDiffusion(MaskAutoencoder(hidden=16), make_mask_unet(sample_size=16, block_out_channels=(16, 32)))
    r = evaluate_masks(md, d['image'], d['instances'], steps=2, batch_size=2)
    assert 0 <= r['pq'] <= 1 and 0 <= r['ae_pq'] <= 1 and r['n'] == 4


def test_swap_and_compose():
    from spectraldiffusion.decoders import MLPDecoder
    torch.manual_seed(0)
    dec = MLPDecoder(6, 4, grid=(2, 2), hidden=(8,))
    a, b = torch.randn(3, 4, 6), torch.randn(3, 5, 6)
    i, j = torch.tensor([0, 3, 1]), torch.tensor([4, 0, 2])
    na, nb, _, _ = swap_slots(a, b, i, j)
    r = torch.arange(3)
    assert torch.equal(na[r, i], b[r, j]) and torch.equal(nb[r, j], a[r, i])
    with torch.no_grad():
        torch.testing.assert_close(dec(na).components[r, i], dec(b).components[r, j])
    assert decode_slots(dec, na).shape == (3, 4, 4)
    with pytest.raises(ValueError, match="j: slot index out of range"): swap_slots(a, b, 0, 5)


def test_slot_mixture_moments():
    from spectraldiffusion.slots import sample_slots
    g = torch.Generator().manual_seed(0)
    mu, var = torch.randn(4, 3, 2, generator=g, dtype=torch.float64), torch.rand(4, 3, 2, generator=g, dtype=torch.float64) + 0.2
    act = torch.tensor([[True, False, True], [True, True, True], [False, False, True], [True, False, False]])
    mix = slot_mixture(mu, var, act)
    # every image weighs 1/4, shared evenly by its active slots
    torch.testing.assert_close(mix.weight.view(4, 3), (act / act.sum(1, keepdim=True) / 4).double())
    draws = sample_slots(mix, 5000, 8, g).reshape(-1, 2)
    w = mix.weight[:, None]
    m = (w * mix.mu).sum(0); v = (w * (mix.var + mix.mu ** 2)).sum(0) - m ** 2
    torch.testing.assert_close(draws.mean(0), m, atol=0.03, rtol=0)
    torch.testing.assert_close(draws.var(0), v, atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="variances: expected shape"): slot_mixture(mu, var[:, :2])


def test_bad_input_errors():
    dec = tiny_slot_decoder()
    s = torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match="images: give images or latents"): dec(s)
    with pytest.raises(ValueError, match=r"\[0,1\]"): dec(s, images=torch.full((2, 3, 16, 16), 2.0))
    with pytest.raises(ValueError, match="D=16"): dec.sample(s[..., :8])
    with pytest.raises(ValueError, match="x: expected latents"): unet_forward(dec.unet, torch.randn(2, 3, 8, 8), 1, s)
    with pytest.raises(ValueError, match="steps"): dec.sample(s, steps=0)
    with pytest.raises(ValueError, match="kind: expected one of"): make_sampler(dec.scheduler, 'heun')
    with pytest.raises(ValueError, match="prediction_type"): make_scheduler('x0')
    with pytest.raises(ValueError, match="cond_drop"): SlotDiffusionDecoder(dec.vae, dec.unet, cond_drop=1.5)
    with pytest.raises(ValueError, match="ids: values must lie"): ids_to_bits(torch.full((1, 2, 2), 16))
    with pytest.raises(ValueError, match="ids: expected"): MaskAutoencoder().encode(torch.zeros(1, 5, 5, dtype=torch.long))
    md = MaskDiffusion(MaskAutoencoder(hidden=8), make_mask_unet(sample_size=4, block_out_channels=(8, 16)))
    img = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="known: expected a bool tensor"):
        md.sample(img, steps=1, known_ids=torch.zeros(1, 8, 8, dtype=torch.long), known=torch.ones(1, 8, 8))
    with pytest.raises(ValueError, match="unet: expected"): MaskDiffusion(MaskAutoencoder(), make_mask_unet(8, 12))
    with pytest.raises(ValueError, match="crop"): train_mask_autoencoder(MaskAutoencoder(), torch.zeros(2, 8, 8, dtype=torch.long), steps=1, crop=16)
