"""The evaluation sections of the run config: ``fid`` (model selection, section 4.2), ``privacy``
(4.3.4), ``utility`` (4.3.5) and ``study`` (the reader study, 4.3.1-4.3.3, and its human gate).
:mod:`medisyn.config` imports them into ``RunConfig``; import them from there."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from medisyn.config_section import _Section


class FIDConfig(_Section):
    num_samples: int = Field(10_000, ge=2, description="real and synthetic images each, section 4.2")
    feature_extractor: Literal["inception", "tiny"] = Field(
        "inception", description="inception = standard pt_inception-2015-12-05 weights; tiny = demo stand-in"
    )
    batch_size: int = Field(50, ge=1)
    num_inference_steps: int | None = Field(
        None, ge=1, description="sampler steps of the per-epoch FID images; None = sampling.num_inference_steps."
        " Model selection only: the gates and served images always use `sampling`",
    )
    seed: int = Field(0, description="picks the real images and the generation seeds")
    bootstrap_resamples: int = Field(200, ge=0, description="bootstrap interval for pooled FID; 0 = off")
    per_specialty: bool = True
    successive_halving: bool = Field(False, description="score every epoch at small N, re-score the best at full N")
    halving_small_n: int = Field(1000, ge=2)
    halving_keep: int = Field(3, ge=1)


class PrivacyConfig(_Section):
    images_per_prompt: int = Field(500, ge=1, description="synthetic images generated per prompt (4.3.4)")
    patch_size: int = Field(
        128, ge=1, description="patch side, pixels: 16 non-overlapping 128x128 patches of a 512 image (4.3.4)"
    )
    distance_threshold: float = Field(0.15, gt=0, description="Carlini et al. normalized patch distance (4.3.4)")
    alpha: float = Field(0.05, gt=0, lt=1, description="one-sided Wilcoxon signed-rank significance (4.4)")
    max_fraction_below: float = Field(
        0.0,
        ge=0,
        le=1,
        description="gate: allowed fraction of pairs at/below the threshold "
        "(0 = any one fails; 4.3.4 inspected them by eye)",
    )
    batch_size: int = Field(
        64, ge=1, description="images per BiomedCLIP forward pass and per streamed train-split batch"
    )
    prompts: list[str] | None = Field(None, description="None = the catalog's privacy prompts (section 4.3.4)")
    min_pairs: int = Field(
        5, ge=1, description="fewer synthetic-real pairs is a failed verdict (too few samples: with n pairs the "
        "smallest one-sided Wilcoxon p is 2^-n, so < 5 can never reach alpha 0.05)"
    )
    timeout_s: float = Field(48 * 3600.0, gt=0, description="the gate is interrupted and fails past this, seconds")


class UtilityTask(_Section):
    name: str = Field(description="task name: report keys, figure names, MLflow metric prefix")
    specialty: str = Field(description="`specialty` column value of the task's images")
    image_type: str = Field(description="`image_type` column value of the task's images")
    multilabel: bool = Field(False, description="labels joined by '|'; sigmoid/BCE classifier (4.3.5 chest X-ray)")
    classes: list[str] | None = Field(
        None, min_length=1, description="label texts the classifier predicts; None = every label in the train split"
    )


class UtilityConfig(_Section):
    n_real_full: int = Field(2000, ge=2, description="classifier (i): real images, section 4.3.5")
    n_real_half: int = Field(1000, ge=1, description="classifier (ii) and (iii): class-stratified real subset of (i)")
    n_synthetic: int = Field(1000, ge=1, description="classifier (iii): synthetic images added")
    epochs: int = Field(15, ge=1, description="section 4.3.5")
    learning_rate: float = Field(1e-4, gt=0, description="AdamW, section 4.3.5")
    batch_size: int = Field(32, ge=1, description="classifier training and inference batch")
    image_size: int = Field(224, ge=16, description="classifier input side, pixels (ResNet-50's ImageNet size)")
    classifier: Literal["resnet50", "tiny_resnet"] = Field(
        "resnet50", description="resnet50 = ImageNet ResNet-50 (4.3.5); tiny_resnet = test/demo stand-in"
    )
    bootstrap_resamples: int = Field(2000, ge=0, description="test-set resamples for the AUROC-difference CI (4.4)")
    ci_level: float = Field(0.95, gt=0, lt=1, description="bootstrap confidence level (4.3.5 reports 95% CIs)")
    max_auroc_drop: float = Field(
        0.05, ge=0, description="gate: upper CI of AUROC(2000 real) - AUROC(1000 real + 1000 synthetic) must not exceed"
    )
    min_synthetic_signal: float | None = Field(
        0.5, ge=0, le=1,
        description="gate (ours, not the paper's): the real-trained classifier must find at least this fraction of"
        " the real images' class signal in the synthetic ones, (AUROC_syn - 0.5) / (AUROC_real - 0.5); None = off",
    )
    tasks: list[UtilityTask] | None = Field(None, description="None = the paper's three tasks (section 4.3.5)")
    timeout_s: float = Field(48 * 3600.0, gt=0, description="the gate is interrupted and fails past this, seconds")

    @model_validator(mode="after")
    def _half_within_full(self) -> UtilityConfig:
        if self.n_real_half > self.n_real_full:
            raise ValueError(f"n_real_half={self.n_real_half} must not exceed n_real_full={self.n_real_full}")
        return self


class StudyTask(_Section):
    """One reader-study task (sections 4.3.1-4.3.3): images of one image type, one class per image."""

    name: str = Field(description="task name: study names, report keys")
    specialty: str = Field(description="`specialty` column value of the real test-split images")
    image_type: str = Field(description="`image_type` column value of the real test-split images")
    prompt_template: str = Field(description="generation prompt; {label} is replaced by the class (4.3.2, 4.3.3)")
    classes: list[str] = Field(min_length=2, description="label texts the readers choose from (`label` column)")
    question: str = Field("Which class does this image show?", description="the question above the choices")

    @model_validator(mode="after")
    def _template_names_the_label(self) -> StudyTask:
        if "{label}" not in self.prompt_template:
            raise ValueError(f"study task {self.name!r}: prompt_template must contain {{label}}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"study task {self.name!r}: classes must be distinct")
        return self


def _paper_study_tasks() -> list[StudyTask]:
    return [
        StudyTask(name="surgery", specialty="surgery", image_type="laparoscopic_cholecystectomy",
                  prompt_template="Laparoscopic cholecystectomy image during {label}.",
                  classes=["clipping and cutting", "Calot's triangle dissection", "cleaning and coagulation"],
                  question="Which surgical phase does this image show?"),  # section 4.3.2
        StudyTask(name="oct", specialty="ophthalmology", image_type="oct",
                  prompt_template="Optical coherence tomography image showing {label}.",
                  classes=["normal findings", "drusen", "diabetic macular edema"],
                  question="Which condition does this image show?"),  # section 4.3.3
    ]


class HumanGateConfig(_Section):
    """Optional approval gate on a closed reader study (issue #15); off by default."""

    enabled: bool = Field(False, description="promote also requires gate.human: a closed study of the version")
    margin: float = Field(
        0.05, ge=0, le=1,
        description="synthetic accuracy may be below real accuracy by at most this (fraction; 4.3.2: it was above)",
    )
    min_readers: int = Field(3, ge=1, description="readers who answered every image (4.3.1: three clinicians)")
    timeout_s: float = Field(600.0, gt=0, description="the gate is interrupted and fails past this, seconds")


class StudyConfig(_Section):
    """Clinician reader study (``medisyn study``; docs/study.md; sections 2.1, 4.3.1-4.3.3)."""

    task: str = Field("surgery", description="name of the task in `tasks` that `study create` builds by default")
    tasks: list[StudyTask] = Field(default_factory=_paper_study_tasks, description="the paper's two tasks")
    images_per_class: int = Field(
        17, ge=1, description="synthetic images per class, and as many real ones: 3 x 17 x 2 = 102 (4.3.2)"
    )
    image_size: int = Field(512, ge=16, description="side, pixels, every image is served at (real and synthetic)")
    seed: int = Field(0, description="shuffle order, real-image choice and generation seeds (recorded)")
    db_url: str | None = Field(
        None, description="SQLAlchemy URL of the answers database; None = $MEDISYN_STUDY_DB_URL, "
        "else sqlite:///medisyn-study.db"
    )
    human_gate: HumanGateConfig = HumanGateConfig()

    @model_validator(mode="after")
    def _task_exists(self) -> StudyConfig:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"study.tasks: task names must be distinct, got {names}")
        if self.task not in names:
            raise ValueError(f"study.task={self.task!r} is not one of study.tasks ({', '.join(names)})")
        return self
