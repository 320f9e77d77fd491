"""Training configuration: one dataclass for base pretraining and for SuTI training."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TrainConfig:
    mode: str = field(default="suti", metadata={"help": "suti (ICL-V2 examples) or pretrain (web pairs, text-to-image)"})
    data: str = field(default="runs/oracle", metadata={"help": "Parquet folder or URI: ICL-V2 for suti, web pairs for pretrain"})
    latents: str = field(default="", metadata={"help": "cached inputs (ray-suti encode output) to train on instead "
                                                       "of --data: neither the VAE nor the text encoder runs"})
    preset: str = field(default="tiny-32", metadata={"help": "model preset when not starting from a checkpoint"})
    init_from: str = field(default="", metadata={"help": "start weights: a checkpoint folder or single .safetensors file"})
    resume_from: str = field(default="", metadata={"help": "a training checkpoint folder to resume (step, weights, EMA)"})
    storage_path: str = field(default="runs/train", metadata={"help": "where Ray Train keeps checkpoints (local, s3://, gs://)"})
    name: str = field(default="suti", metadata={"help": "run name under storage_path"})
    export: str = field(default="", metadata={"help": "folder for the final EMA model (from_pretrained layout)"})
    export_file: str = field(default="", metadata={"help": "also write the final EMA model as one .safetensors file"})
    num_workers: int = field(default=1, metadata={"help": "training workers"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker, NCCL + bf16"})
    placement_strategy: str = field(default="PACK", metadata={"help": "workers over nodes: PACK, SPREAD or STRICT_SPREAD (one per node)"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs reserved per worker"})
    data_cpus: float = field(default=0.25, metadata={"help": "CPUs per Ray Data read and batch-preparing task (on "
                                                           "a cluster, CPU-only nodes take the decoding)"})
    decode_in_worker: bool = field(default=False, metadata={"help": "prepare batches in the training workers instead "
                                                                    "of Ray Data tasks ahead of them"})
    threads: int = field(default=1, metadata={"help": "torch threads per worker"})
    zero_stage: int = field(default=2, metadata={"help": "DeepSpeed ZeRO stage (0 = plain data parallel, 1, 2, 3)"})
    offload: bool = field(default=False, metadata={"help": "ZeRO offload of optimizer state to CPU"})
    batch_size: int = field(default=32, metadata={"help": "examples per worker per step"})
    noise_repeats: int = field(default=2, metadata={"help": "noise levels per target (demos encoded once)"})
    steps: int = field(default=1000, metadata={"help": "optimizer steps in total"})
    lr: float = field(default=0.0, metadata={"help": "learning rate of pretrained weights (0: 1e-3 pretrain, 1e-4 suti)"})
    new_lr: float = field(default=1e-3, metadata={"help": "learning rate of the new neighbour layers"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warm-up steps (also after a resume)"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clipping"})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay of exported weights"})
    text_drop: float = field(default=0.1, metadata={"help": "probability of dropping the prompt"})
    demo_drop: float = field(default=0.1, metadata={"help": "probability of dropping the demos"})
    controls: tuple[str, ...] = field(default=(), metadata={"help": "spatial controls to train (box keypoints edges); "
                                                                    "added to a checkpoint without them"})
    control_drop: float = field(default=0.5, metadata={"help": "probability of dropping each control (every subset is learnt)"})
    adapter_only: bool = field(default=False, metadata={"help": "train only the SuTI layers, the base model frozen "
                                                                  "(IP-Adapter's recipe); pair with --export-adapter"})
    export_adapter: str = field(default="", metadata={"help": "also write the SuTI layers alone as an adapter file"})
    controls_only: bool = field(default=False, metadata={"help": "train only the control encoders (the model without "
                                                                   "controls stays exactly as it was)"})
    max_demos: int = field(default=3, metadata={"help": "most demos per example in training"})
    high_noise_frac: float = field(default=0.0, metadata={"help": "fraction of timesteps drawn from the noisier half (where demos matter)"})
    neighbour_cosine: bool = field(default=False, metadata={"help": "cosine neighbour attention (switches a checkpoint over; see model/layers.py)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward (the "
                                                                            "denoiser and the demo-encoding pass): less memory"})
    demo_grad: bool = field(default=False, metadata={"help": "backpropagate through the demo encoding"})
    train_text_encoder: bool = field(default=True, metadata={"help": "train the text encoder (pixel presets)"})
    checkpoint_every: int = field(default=200, metadata={"help": "steps between checkpoints"})
    report_every: int = field(default=20, metadata={"help": "steps between metric reports"})
    probe_every: int = field(default=100, metadata={"help": "steps between held-out demo-gain probes (suti; 0: off)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept"})
    max_failures: int = field(default=2, metadata={"help": "worker failures survived by resuming"})
    shuffle_buffer: int = field(default=2000, metadata={"help": "rows in the local shuffle buffer"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation and sampling"})

    def __post_init__(self):
        if self.mode not in ("suti", "pretrain"):
            raise ValueError(f"mode must be suti or pretrain, got {self.mode!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError("zero_stage must be 0, 1, 2 or 3")
        if not 1 <= self.max_demos:
            raise ValueError("max_demos must be at least 1")
        from ..model.controls import CONTROL_CHANNELS

        if set(self.controls) - set(CONTROL_CHANNELS):
            raise ValueError(f"controls must be among {list(CONTROL_CHANNELS)}, got {list(self.controls)}")
        if self.adapter_only and self.mode != "suti":
            raise ValueError("adapter_only trains the SuTI layers, in suti mode")
        if self.controls_only and not self.controls:
            raise ValueError("controls_only needs --controls")
        if self.controls and self.mode != "suti":
            raise ValueError("controls are trained in suti mode (ICL-V2 examples carry them)")
        if self.latents and self.mode != "suti":
            raise ValueError("--latents holds encoded ICL-V2 examples: suti mode")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"):
            raise ValueError(f"placement_strategy must be PACK, SPREAD, STRICT_SPREAD or STRICT_PACK, "
                             f"got {self.placement_strategy!r}")

    @property
    def base_lr(self) -> float:
        return self.lr or (1e-3 if self.mode == "pretrain" else 1e-4)
