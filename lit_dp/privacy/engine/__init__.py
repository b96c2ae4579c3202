"""The per-unit clipping engines behind :mod:`lit_dp.privacy.per_sample` (their public face).

Files, in dependency order (each imports only files above it; none imports transformers):

    units.py      Units: how the B rows of a batch form U privacy units; per-unit layouts
    loss.py       the per-unit loss (mean token cross-entropy over label tokens, fp32)
    job.py        Job (one engine call's inputs), ClippedBatch (its output), the clip factor
    registry.py   layer kinds: which rule a module gets; register_layer, layer_kind
    linear.py     rules for a weight used as a @ W.T: per-unit norms (ghost or instantiate
                  route, chosen per layer) and clipped sums
    embedding.py  rules for an embedding weight, and the cross term of a tied embedding
    norms.py      per-row rules for LayerNorm / RMSNorm weights
    clip_plan.py  ClipPlan: squared_norms() then clipped_sums(factor), in that order, enforced
    recorder.py   GhostRecorder: hooks that record (a, g) per layer call; returns a ClipPlan
    fast.py       the "fast" engine (book-keeping ghost clipping): recorder + plan
    vmap.py       the "vmap" engine (torch.func)
    loop.py       the "loop" reference engine (one autograd.grad per unit)

Layer rules that need other libraries are registered from outside: lit_dp.models (through
lit_dp.bitnet) registers BitNet's AutoBitLinear as a "bitlinear" layer.
"""
