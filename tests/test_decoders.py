"""Decoders (MLP feature decoder, spatial broadcast): mixing against loops, pruned slots, overfitting, errors, bench."""
import json
import pytest
import torch
import torch.nn.functional as F

from spectraldiffusion.decoders import (DecoderOutput, MLPDecoder, OracleSlots, SpatialBroadcastDecoder, bench, bench_decoder, build_grid,
                                        check_slots, mask_pool, masked_softmax, overfit, patch_tokens, peak_tensor_memory,
                                        tokens_to_image)


def toy_active(B, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    act = torch.rand(B, K, generator=g) > 0.4
    act[torch.arange(B), torch.randint(0, K, (B,), generator=g)] = True             # at least one per item
    return act


def test_masked_softmax_matches_softmax_over_active_slots():
    lg = torch.randn(4, 6, 3, 5, dtype=torch.float64)
    act = toy_active(4, 6)
    a = masked_softmax(lg, act)
    for b in range(4):
        ref = torch.softmax(lg[b, act[b]], 0)
        torch.testing.assert_close(a[b, act[b]], ref)
        assert (a[b, ~act[b]] == 0).all()


@pytest.mark.parametrize('dec_fn', [
    lambda: MLPDecoder(6, 5, grid=(3, 4), hidden=(16, 16)),
    lambda: SpatialBroadcastDecoder(6, image_size=16, init_size=4, channels=8)])
def test_pruned_slots_have_no_effect_and_masks_are_alphas(dec_fn):
    torch.manual_seed(0)
    dec = dec_fn().double()
    s, act = torch.randn(3, 5, 6, dtype=torch.float64), toy_active(3, 5, 1)
    out = dec(s, act)
    s2 = s.clone(); s2[~act] = 1e4 * torch.randn(int((~act).sum()), 6, dtype=torch.float64)
    assert torch.equal(dec(s2, act).recon, out.recon)
    assert (out.masks[~act] == 0).all()
    torch.testing.assert_close(out.masks.sum(1), torch.ones_like(out.masks[:, 0]))
    # the mix is the alpha-weighted sum of the per-slot outputs of the active slots
    comp = out.components if out.components.ndim == 4 else out.components       # [B,K,N,D] or [B,K,C,H,W]
    m = out.masks.flatten(2)[..., None] if comp.ndim == 4 else out.masks[:, :, None]
    recon = (m * torch.where(act.view(3, 5, *[1] * (comp.ndim - 2)), comp, 0)).sum(1)
    torch.testing.assert_close(recon.reshape(out.recon.shape), out.recon)


def test_mlp_decoder_against_loop():
    torch.manual_seed(1)
    dec = MLPDecoder(4, 3, grid=(2, 2), hidden=(8,)).double()
    s, act = torch.randn(2, 3, 4, dtype=torch.float64), torch.tensor([[True, False, True], [True, True, True]])
    out = dec(s, act)
    for b in range(2):
        for n in range(4):
            ys = [dec.mlp(s[b, k] + dec.pos[0, 0, n]) for k in range(3) if act[b, k]]
            w = torch.softmax(torch.stack([y[-1] for y in ys]), 0)
            torch.testing.assert_close(out.recon[b, n], sum(wi * y[:-1] for wi, y in zip(w, ys)))


def test_spatial_broadcast_decodes_only_active_slots_identically():
    torch.manual_seed(2)
    dec = SpatialBroadcastDecoder(6, image_size=16, init_size=4, channels=8).double()
    s = torch.randn(2, 4, 6, dtype=torch.float64)
    act = torch.tensor([[True, False, True, True], [False, True, False, False]])
    out, full = dec(s, act), dec(s)
    # per-slot outputs of active slots do not depend on which other slots are active
    torch.testing.assert_close(out.components[act], full.components[act])


def test_build_grid_corners_and_ramp():
    g = build_grid(4, 6)
    assert g.shape == (4, 6, 4)
    torch.testing.assert_close(g[..., 1][0], torch.linspace(0, 1, 6))
    torch.testing.assert_close(g[..., 0][:, 0], torch.linspace(0, 1, 4))
    torch.testing.assert_close(g[..., 2:], 1 - g[..., :2])


def test_mask_pool_against_loop():
    f = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    ids = torch.randint(0, 4, (3, 5, 5))
    slots, active = mask_pool(f, ids, 6)
    for b in range(3):
        for k in range(6):
            sel = ids[b] == k
            assert active[b, k].item() == bool(sel.any())
            if sel.any(): torch.testing.assert_close(slots[b, k], f[b][:, sel].mean(1))
            else: assert (slots[b, k] == 0).all()


def stripe_batch(B=4, K=3, content=6, feat=16, grid=(8, 12)):
    g = torch.Generator().manual_seed(0)
    c = torch.randn(B, K, content, generator=g)
    slots = torch.cat([torch.eye(K).expand(B, K, K), c], -1)
    owner = torch.arange(grid[1]) * K // grid[1]
    ids = owner.expand(B, *grid)
    tokens = (c @ torch.randn(content, feat, generator=g) / content ** 0.5).gather(1, ids.reshape(B, -1, 1).expand(-1, -1, feat))
    return slots, ids, tokens


def test_overfit_mlp_decoder():
    torch.manual_seed(0)
    slots, _, tokens = stripe_batch()
    dec = MLPDecoder(slots.shape[-1], 16, grid=(8, 12), hidden=(64, 64))
    losses = overfit(dec, dict(slots=slots, target=tokens), steps=40, lr=1e-2)
    assert losses[-1] <= 0.5 * losses[0], (losses[0], losses[-1])


def test_overfit_spatial_broadcast_decoder():
    torch.manual_seed(0)
    slots, ids, _ = stripe_batch(grid=(16, 16))
    colours = torch.rand(4, 3, 3)                                                    # a colour per slot and image
    images = colours.gather(1, ids.reshape(4, -1, 1).expand(-1, -1, 3)).transpose(1, 2).reshape(4, 3, 16, 16)
    dec = SpatialBroadcastDecoder(slots.shape[-1], image_size=16, init_size=4, channels=16)
    losses = overfit(dec, dict(slots=slots, target=images), steps=40, lr=3e-3)
    assert losses[-1] <= 0.5 * losses[0], (losses[0], losses[-1])


def test_oracle_slots_and_patch_tokens():
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(tokens_to_image(patch_tokens(x, 4), (8, 8), 4), x)
    enc = OracleSlots(slot_dim=5, k=3, channels=4)
    ids = torch.zeros(2, 8, 8, dtype=torch.long); ids[0, :4] = 1
    slots, active = enc(x, ids)
    assert slots.shape == (2, 3, 5) and active.tolist() == [[True, True, False], [True, False, False]]


def test_segments_and_loss():
    masks = torch.zeros(1, 3, 2, 2); masks[0, 2] = 1; masks[0, 0, 0, 0] = 2
    out = DecoderOutput(recon=torch.zeros(1, 4), masks=masks, target=torch.full((1, 4), 2.0))
    assert out.segments().tolist() == [[[1, 3], [3, 3]]]
    assert out.loss().item() == pytest.approx(4.0)


def test_bad_input_errors():
    dec = MLPDecoder(4, 3, grid=(2, 2), hidden=(8,))
    s = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"slots: expected shape \[B,K,D\]"): dec(s[0])
    with pytest.raises(ValueError, match="D=4"): dec(s[..., :2])
    with pytest.raises(TypeError, match="slots: expected a torch.Tensor"): dec(s.tolist())
    with pytest.raises(ValueError, match="NaN"): dec(torch.full((2, 3, 4), float('nan')))
    with pytest.raises(ValueError, match="active: expected a bool tensor"): dec(s, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"batch items \[0\]"): dec(s, torch.tensor([[False] * 3, [True] * 3]))
    with pytest.raises(ValueError, match="target: expected tokens"): dec(s, target=torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match="image_size"): SpatialBroadcastDecoder(4, image_size=48)
    with pytest.raises(ValueError, match="ids: values must lie"): mask_pool(torch.zeros(1, 2, 3, 3), torch.full((1, 3, 3), 5), 3)
    with pytest.raises(ValueError, match="active"): check_slots(s, torch.ones(3, 2, dtype=torch.bool))


def test_peak_tensor_memory_hand_counted():
    a = torch.randn(1024, 1024)                                                      # 4 MB
    def f():
        b = a.repeat(4, 1)                                                           # 16 MB
        return b[:1024] * 2                                                          # + 4 MB while b is alive
    _, m = peak_tensor_memory(f)
    assert 24 <= m['peak_tensor_mb'] < 40, m


def test_bench_quick_covers_every_decoder():
    r = bench(quick=True, threads=1)
    json.dumps(r)
    names = [row['decoder'] for row in r['rows']]
    assert names == ['mlp', 'spatial_broadcast', 'slot_diffusion', 'mask_diffusion', 'image_autoencoder', 'mask_autoencoder']
    for row in r['rows']:
        assert row['train_step_s'] > 0 and row['decode_s'] > 0 and row['train_peak_tensor_mb'] is None
    sd = r['rows'][2]
    assert sd['guided_over_unguided'] > 0 and sd['sample_dpm++_s'] > 0 and sd['sizes']['sample_steps'] == 2


def test_bench_decoder_measures_memory_of_a_training_step():
    torch.manual_seed(0)
    dec = MLPDecoder(16, 256, grid=(16, 16), hidden=(64,))
    slots, target = torch.randn(8, 5, 16), torch.randn(8, 256, 256)
    row = bench_decoder('mlp', dec, dict(slots=slots, target=target), lambda: dec(slots), repeat=1)
    # components [8,5,256,256] float32 = 10.5 MB must be alive during the step
    assert row['train_peak_tensor_mb'] >= 10 and row['train_step_s'] > 0 and row['params'] == sum(p.numel() for p in dec.parameters())
