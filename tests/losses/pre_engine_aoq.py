"""The AOQ loss exactly as it was before the training engine (square B x B, one scalar),
frozen here so a test can show the engine's version keeps its numbers and gradients."""

import torch


def pre_engine_aoq(img_emb, cap_emb, offline: dict, variant="aoq", margin=0.2,
                   offline_margin=0.0, alpha=0.3, beta=1.5, clamp_weights=False,
                   detach_weights=False) -> torch.Tensor:
    """``offline``: (B, E) ``captions`` T', ``images`` I', ``captions2`` T'', ``images2``
    I''. Returns the summed loss (a scalar)."""

    def hinge(m, negative, positive):
        return (m + negative - positive).clamp(min=0)

    def weights(offline_sim, online_hardest):
        w = beta - (offline_sim - online_hardest) / alpha
        if clamp_weights:
            w = w.clamp(min=0)
        return w.detach() if detach_weights else w

    sims = img_emb @ cap_emb.t()
    positives = torch.eye(sims.shape[0], dtype=torch.bool)
    positive = sims.diag()
    negatives = sims.masked_fill(positives, float("-inf"))
    hardest_caption = negatives.max(dim=1).values
    hardest_image = negatives.max(dim=0).values
    s_img_t1 = (img_emb * offline["captions"]).sum(1)
    s_i1_cap = (offline["images"] * cap_emb).sum(1)
    online_c = hinge(margin, hardest_caption, positive)
    online_i = hinge(margin, hardest_image, positive)
    if variant == "aoq":
        online_c = weights(s_img_t1, hardest_caption) * online_c
        online_i = weights(s_i1_cap, hardest_image) * online_i
    m = offline_margin
    offline_terms = hinge(m, s_img_t1, positive) + hinge(m, s_i1_cap, positive)
    if variant != "offtri":
        s_i1_t1 = (offline["images"] * offline["captions"]).sum(1)
        s_i2_t2 = (offline["images2"] * offline["captions2"]).sum(1)
        offline_terms = offline_terms + hinge(m, s_i1_t1, positive) + hinge(m, s_i2_t2, positive)
    return (online_c + online_i + offline_terms).sum()
