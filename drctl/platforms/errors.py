"""Named, non-retryable errors that activities raise (their types are in ``drctl.payloads.ErrorType``)."""

from __future__ import annotations

from temporalio.exceptions import ApplicationError

from drctl.payloads import ErrorType, unknown_instance_message


def unknown_instance(model: str, instance: str, known: list[str]) -> ApplicationError:
    return ApplicationError(
        unknown_instance_message(model, instance, known), type=ErrorType.UNKNOWN_INSTANCE, non_retryable=True
    )


def unknown_model(model: str, known: list[str]) -> ApplicationError:
    return ApplicationError(
        f"unknown model {model!r} (known: {', '.join(known)})", type=ErrorType.UNKNOWN_MODEL, non_retryable=True
    )


def model_load_failed(instance: str, why: str) -> ApplicationError:
    return ApplicationError(
        f"{instance} failed to load its model: {why}", type=ErrorType.MODEL_LOAD_FAILED, non_retryable=True
    )


def not_a_standby(instance: str, role: str) -> ApplicationError:
    return ApplicationError(
        f"{instance} is {role}, not a standby that can be promoted", type=ErrorType.NOT_A_STANDBY, non_retryable=True
    )


def instance_failed(instance: str, why: str) -> ApplicationError:
    return ApplicationError(f"{instance} failed: {why}", type=ErrorType.INSTANCE_FAILED, non_retryable=True)


def checkpoint_corrupt(instance: str, why: str) -> ApplicationError:
    return ApplicationError(
        f"{instance} failed to load its model: {why}", type=ErrorType.CHECKPOINT_CORRUPT, non_retryable=True
    )


def stale_epoch(model: str, epoch: int, current: int) -> ApplicationError:
    return ApplicationError(
        f"{model}: epoch {epoch} is stale (a newer runbook holds epoch {current}); nothing changed",
        type=ErrorType.STALE_EPOCH,
        non_retryable=True,
    )


def check_epoch(model: str, epoch: int | None, current: int) -> None:
    """Raise the non-retryable ``StaleEpoch`` when a fenced step carries an epoch older than the
    model's. ``None`` is an unfenced step (start-up, a test), allowed."""
    if epoch is not None and epoch < current:
        raise stale_epoch(model, epoch, current)
