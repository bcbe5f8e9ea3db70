"""Test setup: 8 simulated CPU devices (must happen before jax initialises its backend)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  flags += " --xla_force_host_platform_device_count=8"
# Tests run tiny models whose time is all compilation: XLA's backend optimisations (fusion
# tuning, vectorisation) cost ~40% of it and buy nothing here. Benchmarks never set this.
if "xla_backend_optimization_level" not in flags:
  flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = flags.strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")


# The slowest test functions of the suite (every parametrization), measured with --durations on
# this 2-core CPU (2026-11-30: 1950 of the suite's 3040 test-seconds, with the tests marked in
# their own files). Marked `slow` here, in one list, so that the README's test command
# (`-m "not slow"`) stays under 10 minutes; `python -m pytest -n 2 -m slow tests` runs them.
SLOW = frozenset({
    "tests/test_contract.py::test_sharded_batch_matches_one_device",
    "tests/test_encode_image.py::test_encoded_equals_image_path",
    "tests/test_train.py::test_sharded_train_step_equals_one_device",
    "tests/test_sharded_model.py::test_sharded_forward_and_generation_equal_one_device",
    "tests/test_demo.py::test_demo_runs_every_method_and_writes_pictures",
    "tests/test_bundled.py::test_answers_an_example_of_every_answered_family_correctly",
    "tests/test_model.py::test_pruned_prefill_then_decode_equals_pruned_reference",
    "tests/test_train_loop.py::test_two_processes_equal_one_process",
    "tests/test_model.py::test_plans_that_keep_everything_are_the_identity",
    "tests/test_train_loop.py::test_smoke_training_reduces_loss",
    "tests/test_contract.py::test_shape_order_src",
    "tests/test_contract.py::test_vmap_over_extra_axis",
    "tests/test_notebooks.py::test_runs",
    "tests/test_train_loop.py::test_sigkill_and_resume_is_bit_identical",
    "tests/test_contract.py::test_batch_examples_are_independent",
    "tests/test_readme.py::test_block_runs",
    "tests/test_sweep.py::test_tiny_sweep_end_to_end",
    "tests/test_sweep.py::test_tiny_sweep_with_adaptive_policies",
    "tests/test_contract.py::test_examples_differ_when_inputs_differ",
    "tests/test_pyramid.py::test_pyramid_levels_nest",
    "tests/test_plan_options.py::test_choices_match_the_methods",
    "tests/test_sharded_model.py::test_sharded_float32_within_reduction_noise",
    "tests/test_contract.py::JitMatchesEager::test_jit_matches_eager_('tome')__with_jit",
    "tests/test_encode_image.py::test_llm_stage_acts_on_given_image_tokens",
    "tests/test_contract.py::JitMatchesEager::test_jit_matches_eager_('holitom')__with_jit",
    "tests/test_optimizer.py::test_frozen_parameters_get_no_gradient_and_no_backward_pass",
    "tests/test_dart.py::test_hand_worked",
    "tests/test_cost.py::test_analytic_counts_follow_the_plans",
    "tests/test_train.py::test_training_reduces_the_loss",
    "tests/test_sharded_model.py::test_sharded_video_explicit_axes_equals_one_device",
    "tests/test_model.py::test_sampling",
    "tests/test_contract.py::JitMatchesEager::test_jit_matches_eager_('prunevid')__with_jit",
    "tests/test_dart.py::test_matches_reference",
    "tests/test_model.py::test_prompts_of_different_lengths_generate_as_alone",
    "tests/test_holitom.py::test_outer_matches_official",
    "tests/test_bundled.py::test_answers_have_each_family_format",
    "tests/test_finetune.py::test_finishes_and_writes_checkpoints",
    "tests/test_bundled.py::test_answers_beat_chance_where_the_model_learned",
    "tests/test_adaptive.py::test_padding_is_invisible_in_the_decoder",
    "tests/test_train.py::test_gradient_matches_finite_differences",
    "tests/test_model.py::test_llm_attention_scores_equal_brute_force",
    "tests/test_vispruner.py::test_matches_reference",
    # Added 2026-11-30 (seventh session) when the learned compressors and distillation came in:
    # the fast set had grown to 685 s; these 28 took 513 of its test-seconds.
    "tests/test_distill_training.py::test_a_few_steps_lower_the_distillation_loss",
    "tests/test_learned_training.py::test_a_few_steps_lower_the_loss",
    "tests/test_learned_modules.py::test_shapes_and_budget_under_jit",
    "tests/test_distill.py::test_teacher_gets_no_gradient_and_stays_unchanged",
    "tests/test_learned_model.py::test_config_trains_only_the_compressor",
    "tests/test_learned_model.py::test_qformer_reads_the_prompt_but_not_the_answer",
    "tests/test_distill_training.py::test_the_loop_distils_from_the_config",
    "tests/test_learned_model.py::test_plan_runs_with_its_budgets_and_subtrees",
    "tests/test_learned_model.py::test_checkpoints_carry_the_compressor",
    "tests/test_plan_options.py::test_vispruner_through_the_model",
    "tests/test_vispruner.py::test_top_k_by_bins_equals_lax_top_k",
    "tests/test_docs.py::test_adding_a_method_examples_run",
    "tests/test_contract.py::JitMatchesEager::test_jit_matches_eager_('holitom')__without_jit",
    "tests/test_dpc_knn.py::test_ties_are_deterministic_and_rng_runs",
    "tests/test_remat.py::test_remat_same_gradients",
    "tests/test_finetune.py::test_the_step_compiles_once",
    "tests/test_cost.py::test_flops_agree_with_xla",
    "tests/test_contract.py::JitMatchesEager::test_jit_matches_eager_('tome')__without_jit",
    "tests/test_tome.py::test_rounds_match_reference",
    "tests/test_eval_cli.py::test_eval_on_jsonl",
    "tests/test_learned_m3.py::test_levels_are_nested",
    "tests/test_plan_options.py::test_rng_and_text_signals_by_entry",
    "tests/test_model.py::test_video_frames_are_encoded_independently",
    "tests/test_contract.py::JitMatchesEager::test_jit_matches_eager_('prunevid')__without_jit",
    "tests/test_plan_options.py::test_vispruner_and_divprune_compare_features_unless_asked_for_keys",
    "tests/test_model.py::test_tome_in_the_vit_merges_exact_duplicates_without_changing_anything",
    "tests/test_topk_pool.py::test_pool_conserves_mass",
    "tests/test_sweep.py::test_sweep_records_which_token_carries_each_patch",
    # 2026-11-30 (session 8, 1170 fast tests in 469 s on a clean clone): the five slowest.
    "tests/test_trained_compressors.py::test_round_trip_gives_the_same_answers",
    "tests/test_learned_modules.py::test_qformer_text_changes_the_tokens_and_padding_does_not",
    "tests/test_holitom.py::test_inner_merge_matches_official",
    "tests/test_optimizer.py::test_gradient_accumulation_equals_one_big_batch",
    "tests/test_tome.py::test_mass_is_conserved",
    # DyCoke / MustDrop (2026-11-30): model-level variants beside the one kept in the fast set.
    "tests/test_dycoke.py::test_pruning_nothing_leaves_the_model_unchanged",
    "tests/test_dycoke.py::test_clip_through_ttm_and_kv_policy",
    "tests/test_dycoke.py::test_decoding_equals_reference_other_gates_and_gemma2",
    "tests/test_mustdrop.py::test_whole_plan_with_the_vit_merge",
    "tests/test_mustdrop.py::test_dropping_nothing_leaves_the_model_unchanged",
    "tests/test_mustdrop.py::test_sweep_runs_mustdrop_in_the_decoder",
    # 2026-11-30 (session 9, 1264 fast tests in 547 s on a clean clone, a sweep beside it for
    # the first half): four of the slowest, about 80 test-seconds, for CI's 10-minute margin.
    "tests/test_trained_compressors.py::test_bad_files_and_plans_are_refused",
    "tests/test_learned_modules.py::test_padding_tokens_are_ignored",
    "tests/test_learned_modules.py::test_tokenlearner_is_a_convex_mix_of_the_input",
    "tests/test_encode_image.py::test_mismatches_are_refused",
})


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
  """Marks the SLOW tests; then modules with a `slow` test run first, each module's tests still
  together and in order.

  `pytest -n 2` hands tests out in collection order; a slow module that comes last keeps one
  worker busy alone at the end, or is split over both workers, each running its module fixtures
  (test_train_loop's reference training run) again.
  """
  del config
  for item in items:
    if item.nodeid.split("[")[0] in SLOW:
      item.add_marker(pytest.mark.slow)
  slow = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.path not in slow)  # stable: the order otherwise kept
