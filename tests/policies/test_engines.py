"""Engine profiles, pure: which engine a model runs, and what its health answers mean for its tier."""

from __future__ import annotations

import json

import pytest

from drctl.policies.engines import MODEL_HEADER, PROFILES, Engine, completion, profile
from drctl.policies.schema import DRPolicy, ModelPolicy

VLLM, SGLANG, DEMO = PROFILES[Engine.VLLM], PROFILES[Engine.SGLANG], PROFILES[Engine.DEMO]


def test_a_model_runs_vllm_unless_it_says_otherwise() -> None:
    policy = DRPolicy.model_validate(
        {"models": [{"name": "a"}, {"name": "b", "engine": "sglang"}, {"name": "c", "engine": "demo"}]}
    )
    assert [m.engine_profile.engine for m in policy.models] == [Engine.VLLM, Engine.SGLANG, Engine.DEMO]
    with pytest.raises(ValueError, match="engine"):
        ModelPolicy.model_validate({"name": "d", "engine": "tgi"})


def test_each_engine_is_asked_on_its_own_paths() -> None:
    assert (VLLM.health_path, VLLM.models_path, VLLM.is_sleeping_path) == ("/health", "/v1/models", "/is_sleeping")
    assert VLLM.sleep is not None and VLLM.wake is not None
    assert (VLLM.sleep.path, VLLM.sleep.params, VLLM.wake.path) == ("/sleep", {"level": "1"}, "/wake_up")
    assert VLLM.server_env == {"VLLM_SERVER_DEV_MODE": "1"} and "--enable-sleep-mode" in VLLM.server_flags
    assert SGLANG.sleep is not None and SGLANG.wake is not None
    assert (SGLANG.sleep.path, SGLANG.wake.path) == ("/release_memory_occupation", "/resume_memory_occupation")
    assert SGLANG.is_sleeping_path is None and "--enable-memory-saver" in SGLANG.server_flags
    assert DEMO.load_progress_path == "/load_progress" and VLLM.load_progress_path is None
    for engine in Engine:  # every engine answers OpenAI's completions, which is what verify sends
        assert profile(engine).completion("m") == completion("m")
    call = completion("m", prompt="hi", max_tokens=8)
    assert (call.method, call.path, call.json) == (
        "POST",
        "/v1/completions",
        {"model": "m", "prompt": "hi", "max_tokens": 8},
    )
    assert MODEL_HEADER == "model-name"


def test_reloading_weights_from_disk_is_the_demos_and_vllms() -> None:
    assert [(c.path, c.params) for c in DEMO.reload_weights] == [("/sleep", {"level": "2"}), ("/wake_up", {})]
    assert [(c.path, c.params, c.json) for c in VLLM.reload_weights] == [
        ("/sleep", {"level": "2"}, None),
        ("/wake_up", {"tags": "weights"}, None),
        ("/collective_rpc", {}, {"method": "reload_weights"}),
        ("/wake_up", {"tags": "kv_cache"}, None),
    ]
    assert SGLANG.reload_weights == ()


# -- what a health answer means, per tier ----------------------------------------------------------


def test_200_awake_is_healthy_for_every_tier() -> None:
    for may_sleep in (True, False):
        assert VLLM.judge_health(200, "", asleep=False, may_sleep=may_sleep).detail == "/health 200, awake"
        assert VLLM.judge_health(200, "", asleep=None, may_sleep=may_sleep).healthy  # no is_sleeping answer


def test_vllm_asleep_answers_200_and_only_a_warm_standby_may_be_asleep() -> None:
    warm = VLLM.judge_health(200, "", asleep=True, may_sleep=True)
    assert warm.healthy and "loaded and asleep" in warm.detail and "/is_sleeping true" in warm.detail
    hot = VLLM.judge_health(200, "", asleep=True, may_sleep=False)
    assert not hot.healthy and not hot.final and "asleep" in hot.detail


def test_a_health_answer_that_says_sleeping_is_asleep() -> None:
    body = json.dumps({"status": "sleeping"})
    assert DEMO.judge_health(503, body, asleep=None, may_sleep=True).healthy
    assert not DEMO.judge_health(503, body, asleep=None, may_sleep=False).healthy


def test_a_failed_model_is_a_final_failure_with_its_reason() -> None:
    progress = json.dumps({"state": "failed", "error": "checksum mismatch: expected 1, got 2"})
    verdict = DEMO.judge_health(503, "", asleep=None, may_sleep=True, load_progress=progress)
    assert not verdict.healthy and verdict.final
    assert verdict.detail == "/health 503 failed: checksum mismatch: expected 1, got 2"
    old_demo = json.dumps({"status": "failed", "error": "checksum mismatch"})  # said in the health answer
    assert DEMO.judge_health(503, old_demo, asleep=None, may_sleep=False).final


def test_loading_or_dead_is_unhealthy_but_not_final() -> None:
    loading = DEMO.judge_health(503, "", asleep=None, may_sleep=True, load_progress='{"state": "loading"}')
    assert not loading.healthy and not loading.final and loading.detail == "/health 503 loading: (no body)"
    dead = VLLM.judge_health(500, "EngineDeadError", asleep=None, may_sleep=False)
    assert not dead.healthy and not dead.final and dead.detail == "/health 500: EngineDeadError"


def test_the_model_list_says_whether_the_model_is_ready() -> None:
    listed = json.dumps({"object": "list", "data": [{"id": "other"}, {"id": "m", "object": "model"}]})
    assert VLLM.lists_model(listed, "m")
    assert not VLLM.lists_model(json.dumps({"object": "list", "data": []}), "m")
    assert not VLLM.lists_model("not json", "m") and not VLLM.lists_model("[]", "m")
