"""mFSR: VSE++ plus feature separation (mo/se/sp) and image and caption reconstruction.

Networks: ``model`` (encoders, separation heads, generator G, caption decoder; one optimizer)
and, with image reconstruction, the discriminators ``d1`` (real/fake) and ``d2`` (pair
consistency), each with its own optimizer (DCGAN Adam, betas (0.5, 0.999)). One step: the
model's forward once; D1 and D2 are updated on the detached fakes; then the model is updated
with ``L = L_se + s (w_mo L_mo + w_sp L_sp + w_img L_G + w_cap L_cap)``, the discriminators
entering L_G as frozen functions (no gradient reaches their weights); ``s`` is 1 during the
hinge's warm-up and ``loss.aux_max_violation`` after it (1, the paper's form, by default). Every term has a switch, so each
ablation row of the paper (base / +mo&sp / +img-re / +cap-re / all) is one config.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from xmdist.config import OptimConfig, check
from xmdist.dist import gather
from xmdist.losses.mfsr import caption_loss, discriminator_loss, generator_loss, modality_loss, specific_loss
from xmdist.methods.base import Network, Phase
from xmdist.methods.captions import CaptionMethod
from xmdist.methods.parts import discriminator_optim, frozen, share
from xmdist.methods.registry import register
from xmdist.methods.vsepp import VSELossConfig, VSEModelConfig
from xmdist.models.mfsr import Discriminator, FeatureSeparation, MFSRModel, target_images


@dataclass
class MFSRModelConfig(VSEModelConfig):
    feature_dim: int = 1024  # pooled image/caption features v, l (the encoders' output)
    # embed_dim (inherited): size of mo, se and sp; se is the retrieval space
    image_recon: bool = True  # generator G and discriminators D1, D2
    caption_recon: bool = True  # caption decoder
    recon_size: int = 64  # reconstructed image side (32 or 64)
    ngf: int = 64  # generator width (DCGAN)
    ndf: int = 64  # discriminator width
    decoder_hidden: int = 512
    sep_trunk: str = "relu"  # separation trunk: relu (the paper's MLP) | leaky | linear
    sep_init: str = "default"  # separation layers' init: default (torch's) | orthogonal (zero biases)
    # parts computed as normalize(feature + head(trunk(feature))), heads started at 0: none (the
    # paper's MLP) | se (the retrieval part only) | all
    sep_residual: str = "none"

    def validate(self) -> None:
        super().validate()
        check(self.sep_trunk in FeatureSeparation.TRUNKS, "model.sep_trunk",
              f"must be one of {', '.join(FeatureSeparation.TRUNKS)}")
        check(self.sep_init in FeatureSeparation.INITS, "model.sep_init",
              f"must be one of {', '.join(FeatureSeparation.INITS)}")
        check(self.sep_residual in FeatureSeparation.RESIDUALS, "model.sep_residual",
              f"must be one of {', '.join(FeatureSeparation.RESIDUALS)}")
        check(self.sep_residual == "none" or self.embed_dim == self.feature_dim, "model.sep_residual",
              f"needs model.embed_dim ({self.embed_dim}) = model.feature_dim ({self.feature_dim})")
        check(self.feature_dim >= 1, "model.feature_dim", "must be >= 1")
        check(self.recon_size in (32, 64), "model.recon_size", "must be 32 or 64")
        check(self.ngf >= 1 and self.ndf >= 1, "model.ngf", "ngf and ndf must be >= 1")


@dataclass
class MFSRLossConfig(VSELossConfig):
    modality: bool = True  # L_mo
    specific: bool = True  # L_sp
    w_mo: float = 1.0
    w_sp: float = 1.0
    w_img: float = 1.0  # L_G (needs model.image_recon)
    w_cap: float = 1.0  # L_cap (needs model.caption_recon)
    # pixel L1 of G's reconstruction against the target image, added to L_G's weight: 0 is the
    # paper's L_G (adversarial + feature matching only)
    w_pix: float = 0.0
    # multiplier on every term but L_se once the hinge turns to max violation: the summed hinge
    # falls about 20-50x there, and with the gradient clipped at every step the other terms'
    # share of each step would grow by as much. 1 is the paper's form (constant weights).
    aux_max_violation: float = 1.0
    delta: float = 1.0  # margin between the two modality means
    feature_matching: float = 1.0  # beta in L_G
    d_optim: OptimConfig = field(default_factory=discriminator_optim)

    def validate(self) -> None:
        super().validate()
        for k in ("w_mo", "w_sp", "w_img", "w_cap", "w_pix", "delta", "feature_matching", "aux_max_violation"):
            check(getattr(self, k) >= 0, f"loss.{k}", "must be >= 0")
        self.d_optim.validate()


@register("mfsr")
class MFSR(CaptionMethod):
    """VSE++'s global-batch hinge on ``se``, plus the mFSR terms and networks."""
    model_config = MFSRModelConfig
    loss_config = MFSRLossConfig

    def build(self) -> dict[str, Network]:
        m, c = self.cfg.model, self.cfg.loss
        model = MFSRModel(len(self.vocab), m.backbone, m.feature_dim, m.embed_dim, m.word_dim, m.text_layers,
                          m.weights, m.finetune, image_recon=m.image_recon, caption_recon=m.caption_recon,
                          image_size=m.recon_size, ngf=m.ngf, decoder_hidden=m.decoder_hidden,
                          sep_trunk=m.sep_trunk, sep_init=m.sep_init,
                          sep_residual=m.sep_residual)
        nets = {"model": Network(model, self.cfg.optim)}
        if m.image_recon:
            nets["d1"] = Network(Discriminator(m.ndf, 3, m.recon_size), c.d_optim)
            nets["d2"] = Network(Discriminator(m.ndf, 6, m.recon_size), c.d_optim)
        return nets

    @property
    def phases(self) -> list[Phase]:
        gan = [Phase("d1", self.d1_loss), Phase("d2", self.d2_loss)] if self.cfg.model.image_recon else []
        return [*gan, Phase("model", self.model_loss)]

    def _share(self, local_mean: torch.Tensor) -> torch.Tensor:
        return share(local_mean, self.env)

    def _real(self, batch: dict) -> torch.Tensor:
        return target_images(batch["images"], self.cfg.model.recon_size)

    def d1_loss(self, nets: dict, batch: dict, out: dict, epoch: int) -> dict[str, torch.Tensor]:
        d1 = nets["d1"].model
        real, fake = d1(self._real(batch))["logits"], d1(out["fake"].detach())["logits"]
        loss = discriminator_loss(real, fake)
        return {"loss": self._share(loss), "d1_real": self._share(torch.sigmoid(real).mean()),
                "d1_fake": self._share(torch.sigmoid(fake).mean())}

    def d2_loss(self, nets: dict, batch: dict, out: dict, epoch: int) -> dict[str, torch.Tensor]:
        d2, x = nets["d2"].model, self._real(batch)
        real = d2(torch.cat([x, x], 1))["logits"]
        fake = d2(torch.cat([x, out["fake"].detach()], 1))["logits"]
        mismatch = d2(torch.cat([x, x.roll(1, 0)], 1))["logits"]  # another image of the batch
        loss = discriminator_loss(real, fake, mismatch)
        return {"loss": self._share(loss), "d2_real": self._share(torch.sigmoid(real).mean()),
                "d2_fake": self._share(torch.sigmoid(fake).mean())}

    def model_loss(self, nets: dict, batch: dict, out: dict, epoch: int) -> dict[str, torch.Tensor]:
        c, m, n = self.cfg.loss, self.cfg.model, len(batch["image_ids"])
        v_se, l_se = out["img_se"], out["txt_se"]
        terms = {"se": self.hinge(v_se, l_se, batch["image_ids"], epoch)}
        total = terms["se"]
        big_n = n * self.env.world_size
        s = c.aux_max_violation if c.max_violation and epoch >= c.warmup_epochs else 1.0
        if c.modality:
            terms["mo"] = modality_loss(out["img_mo"], out["txt_mo"], gather(out["img_mo"], grad=True),
                                        gather(out["txt_mo"], grad=True), c.delta)
            total = total + s * c.w_mo * terms["mo"]
        if c.specific:
            terms["sp"] = specific_loss(v_se, out["img_sp"], l_se, out["txt_sp"], big_n)
            total = total + s * c.w_sp * terms["sp"]
        if m.image_recon:
            x, fake = self._real(batch), out["fake"]
            d1, d2 = frozen(nets["d1"].module), frozen(nets["d2"].module)
            f_real, f_fake = d1(x), d1(fake)
            terms["img"] = self._share(generator_loss(f_fake["logits"], d2(torch.cat([x, fake], 1))["logits"],
                                                      f_real["features"].detach(), f_fake["features"],
                                                      c.feature_matching))
            l1 = self._share(F.l1_loss(fake if c.w_pix else fake.detach(), x))  # w_pix 0: monitoring only
            terms["img_l1"] = l1.detach()
            total = total + s * (c.w_img * terms["img"] + (c.w_pix * l1 if c.w_pix else 0.0))
        if m.caption_recon:
            terms["cap"] = self._share(caption_loss(out["cap_logits"], batch["tokens"]))
            total = total + s * c.w_cap * terms["cap"]
        # DDP (and ZeRO) expect every parameter to get a gradient each step; switched-off terms
        # leave the mo/sp heads out of the graph, so they enter with weight zero instead.
        total = total + 0.0 * sum(out[k].sum() for k in ("img_mo", "txt_mo", "img_sp", "txt_sp"))
        return {"loss": total, **terms}

    @torch.no_grad()
    def log_media(self, nets: dict, batch: dict, out: dict, logger, step: int) -> None:
        """Input vs reconstructed images (top row real, bottom row G) and decoded captions."""
        from torchvision.utils import make_grid

        k = min(8, len(batch["image_ids"]))
        if self.cfg.model.image_recon:
            pair = torch.cat([self._real(batch)[:k], out["fake"][:k].float()])
            logger.image("media/real_vs_reconstructed", make_grid(pair.cpu() * 0.5 + 0.5, nrow=k), step)
        if self.cfg.model.caption_recon:
            model = nets["model"].module
            code = torch.cat([out["txt_mo"], out["txt_se"], out["txt_sp"]], 1)[:k]
            greedy = model.decoder.greedy(code.to(next(model.decoder.parameters()).dtype),
                                          batch["tokens"].shape[1] + 2)
            lines = [f"{self.vocab.decode(t.tolist())}  <-  {self.vocab.decode(g.tolist())}"
                     for t, g in zip(batch["tokens"][:k], greedy)]
            logger.text("media/captions_input_vs_reconstructed", "\n\n".join(lines), step)
