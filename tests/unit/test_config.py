"""Config validated at the edge: wrong keys and values fail before Ray starts, naming the field."""

from __future__ import annotations

import pytest

from sft_ray.config import ConfigError
from sft_ray.configload import load_config


def test_minimal_config_and_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("input: a.jsonl\noutput: out\nmodel: {name: m}\n")
    cfg = load_config(cfg_file, ["num_repeats=4", "responses_create_params.temperature=0.5",
                                 "model.api=responses", "filter.min_reward=0.8", "resources.generate_actors=[1, 3]"])
    assert cfg.num_repeats == 4
    assert cfg.responses_create_params.temperature == 0.5
    assert cfg.model.api == "responses"
    assert cfg.filter.min_reward == 0.8
    assert cfg.resources.generate_actors == (1, 3)


def test_nemo_gym_names_are_accepted():
    cfg = load_config(None, ["input_jsonl_fpath=x.jsonl", "output=o", "model.name=m",
                                 "num_samples_in_parallel=8"])
    assert cfg.input == "x.jsonl" and cfg.num_samples_in_parallel == 8


def test_sampling_passthrough_keys_allowed():
    cfg = load_config(None, ["input=x", "output=o", "model.name=m", "responses_create_params.stop=[END]"])
    assert cfg.responses_create_params.model_dump()["stop"] == ["END"]


@pytest.mark.parametrize(
    "override, field",
    [
        ("model.nmae=x", "model.nmae: unknown key"),
        ("num_repeats=0", "num_repeats"),
        ("model.api=completions", "model.api"),
        ("responses_create_params.temperature=9", "responses_create_params.temperature"),
        ("verifier.type=regex", "verifier.pattern is required"),
        ("verifier.type=python", "verifier.function"),
        ("verifier.type=regex verifier.pattern=([", "not a valid regular expression"),
        ("shuffle.sed=3", "shuffle.sed: unknown key"),
        ("model.name=", "model.name is required"),
        ("model.backend=vllm model.engine_kwargs.tensor_parallel_size=0", "tensor_parallel_size"),
        ("verifier.type=judge verifier.judge.model.name=j verifier.judge.responses_create_params.temprature=0",
         "verifier.judge.responses_create_params.temprature"),
        ("verifier.type=judge verifier.judge.model.name=j verifier.judge.responses_create_params.temperature=5",
         "verifier.judge.responses_create_params.temperature"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["input=x", "output=o", "model.name=m", *override.split()])
    assert field in str(e.value)


def test_missing_required_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="input"):
        load_config(None, ["output=o", "model.name=m"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["input=x", "output=o", "model.name=m", "num_repeats"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_vllm_backend_needs_no_name():
    cfg = load_config(None, ["input=x", "output=o", "model.backend=vllm"])
    assert cfg.model.name is None


JUDGE = ["input=x", "output=o", "model.name=m", "verifier.type=judge"]


def test_vllm_judge_takes_the_model_sections_keys(tmp_path):
    tpl = tmp_path / "chat.jinja"
    tpl.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    cfg = load_config(None, JUDGE + ["verifier.judge.model.backend=vllm", f"verifier.judge.model.chat_template={tpl}",
                                     "verifier.judge.model.engine_kwargs={max_model_len: 1024, dtype: float32}",
                                     "verifier.judge.model.extra_body={structured_outputs: {choice: ['[[A=B]]', "
                                     "'[[A!=B]]']}}", "resources.score_num_gpus=1"])
    judge = cfg.verifier.judge
    assert judge.model.name is None  # the embedded default model
    assert judge.model.chat_template.startswith("{% for m")  # read from the file, as for `model`
    assert cfg.verifier.vllm_judges() == [judge] and cfg.resources.score_num_gpus == 1
    # math with a vLLM judge fallback, and one vLLM judge beside openai ones in a composite
    load_config(None, ["input=x", "output=o", "model.name=m", "verifier.type=math",
                       "verifier.judge.model.backend=vllm"])
    comps = ('[{type: judge, judge: {model: {backend: vllm}}}, '
             '{type: judge, judge: {model: {name: j, base_url: "http://h/v1"}}}]')
    mixed = load_config(None, ["input=x", "output=o", "model.name=m", "verifier.type=composite",
                               f"verifier.components={comps}"])
    assert len(mixed.verifier.vllm_judges()) == 1
    assert load_config(None, JUDGE + ["verifier.judge.model.name=j"]).verifier.vllm_judges() == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["verifier.judge.model.base_url=http://h/v1"], "verifier.judge.model.name is required with the openai backend"),
        (["verifier.judge.model.backend=vllm", "verifier.judge.model.extra_body={temperature: 0}"],
         "extra_body.temperature: with backend vllm, extra_body holds only `structured_outputs`"),
        (["verifier.judge.model.backend=vllm",
          "verifier.judge.model.extra_body={structured_outputs: {choice: [a], regex: b}}"], "exactly one of"),
        (["verifier.judge.model.backend=vllm", "verifier.judge.model.extra_body={structured_outputs: {chose: [a]}}"],
         "exactly one of"),
        (["verifier.judge.model.backend=vllm", "verifier.judge.model.engine_kwargs.tensor_parallel_size=0"],
         "tensor_parallel_size must be a positive integer"),
        (["verifier.judge.model.backend=llama"], "verifier.judge.model.backend"),
        (["resources.score_num_gpus=-1"], "resources.score_num_gpus"),
    ],
)
def test_judge_model_combinations_that_are_refused(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, JUDGE + overrides)
    assert message in str(e.value)


def test_two_vllm_judges_are_refused():
    two = '[{type: judge, judge: {model: {backend: vllm}}}, {type: math, judge: {model: {backend: vllm}}}]'
    with pytest.raises(ConfigError, match="at most one judge with backend vllm"):
        load_config(None, ["input=x", "output=o", "model.name=m", "verifier.type=composite",
                           f"verifier.components={two}"])


def test_generation_model_structured_outputs_with_vllm():
    cfg = load_config(None, ["input=x", "output=o", "model.backend=vllm",
                             "model.extra_body={structured_outputs: {regex: '[0-9]+'}}"])
    assert cfg.model.extra_body == {"structured_outputs": {"regex": "[0-9]+"}}
    # openai: extra_body is the request body's, passed as written
    assert load_config(None, ["input=x", "output=o", "model.name=m", "model.extra_body={x: 1}"]).model.extra_body


@pytest.mark.parametrize("text, key, first, again", [
    ("input: a\noutput: o\nnum_repeats: 4\nmodel: {name: m}\nnum_repeats: 1\n", "num_repeats", 3, 5),
    ("input: a\noutput: o\nmodel:\n  name: m\nmodel:\n  name: n\n", "model", 3, 5),
    ("input: a\noutput: o\nmodel:\n  name: m\n  api: chat\n  name: n\n", "name", 4, 6),
])
def test_duplicate_yaml_keys_are_refused_naming_key_and_line(tmp_path, text, key, first, again):
    # PyYAML keeps the last of two equal keys silently: a run would quietly use the other value.
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file)
    assert str(e.value) == f"{cfg_file}:{again}: key {key!r} is given twice (first on line {first}); remove one"


def test_yaml_merge_keys_and_anchors_still_load(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("input: a\noutput: o\nmodel: &m {name: m, api: chat}\n"
                        "verifier:\n  type: judge\n  judge:\n    model:\n      <<: *m\n      name: j\n")
    assert load_config(cfg_file).verifier.judge.model.name == "j"


@pytest.mark.parametrize("value, message", [
    ("[4, 1]", "min 4 greater than max 1"), ("[0, 2]", "at least 1"), ("0", "at least 1")])
@pytest.mark.parametrize("key", ["generate_actors", "score_actors"])
def test_actor_ranges_are_checked(key, value, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["input=x", "output=o", "model.name=m", f"resources.{key}={value}"])
    assert f"resources.{key}: " in str(e.value) and message in str(e.value)


@pytest.mark.parametrize("overrides, message", [
    (["model.backend=vllm", "model.base_url=http://h/v1"],
     "model.base_url: unknown key for the vllm backend (base_url applies to the openai / anthropic backend)"),
    (["model.tool_parser=hermes"], "model.tool_parser: unknown key for the openai backend (tool_parser applies to the "
     "vllm backend)"),
    (["verifier.type=regex", "verifier.pattern=x", "verifier.function=m:f"],
     "verifier.function: unknown key for verifier type regex (function applies to verifier type python)"),
    (["verifier.pattern=x"], "verifier.pattern: unknown key for verifier type exact_match (pattern applies to "
     "verifier type regex)"),
    (["verifier.type=composite", "verifier.components=[{type: mcq, sandbox: none}]"],
     "verifier.components.0.sandbox: unknown key for verifier type mcq (sandbox applies to verifier type code)"),
    (["verifier.type=judge", "verifier.judge.model.name=j", "verifier.judge.model.engine_kwargs={}"],
     "verifier.judge.model.engine_kwargs: unknown key for the openai backend"),
    (["verifier.type=regex", "verifier.nope=1"], "verifier.nope: unknown key for verifier type regex"),
    (["verifier.type=fuzzy"], "verifier.type: must be one of exact_match, math, mcq, regex, python, code, "
     "json_schema, judge, composite, nemo_gym, none (got 'fuzzy')"),
])
def test_a_key_of_another_verifier_type_or_backend_is_refused_naming_both(overrides, message):
    # One section per verifier type and per backend (issue 29): a key that only another type reads
    # would be ignored without a word; it is refused, saying which type it belongs to.
    with pytest.raises(ConfigError) as e:
        load_config(None, ["input=x", "output=o", "model.name=m", *overrides])
    assert message in str(e.value)


def test_sections_by_type_keep_the_yaml_and_run_json_as_they_were(tmp_path):
    from sft_ray.config import VERIFIER_TYPES, RunConfig, from_stored

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("input: a\noutput: o\nmodel: {name: m}\nverifier: {answer_field: gold}\n")
    cfg = load_config(cfg_file)  # no `type`: the default type, exact_match
    assert cfg.verifier.type == "exact_match" and cfg.verifier.answer_field == "gold"
    stored = cfg.stored()  # run.json: every type's and backend's keys, the others at their defaults
    assert stored["verifier"]["pattern"] is None and stored["verifier"]["code"]["mode"] == "share"
    assert stored["model"]["engine_kwargs"] == {} and stored["model"]["base_url"] == "https://api.openai.com/v1"
    assert set(stored["verifier"]) == set().union(*(t.model_fields for t in VERIFIER_TYPES))
    # ...and a run.json config (this one, or one written before the split) validates again
    again = RunConfig.model_validate(from_stored(stored))
    assert again.stored() == stored
    vllm = load_config(None, ["input=x", "output=o", "model.backend=vllm", "verifier.type=composite",
                              "verifier.components=[{type: judge, judge: {model: {backend: vllm}}}, {type: regex, "
                              "pattern: a}]"])
    assert RunConfig.model_validate(from_stored(vllm.stored())).stored() == vllm.stored()


def test_an_override_by_the_nemo_gym_name_replaces_the_yaml_value_and_the_other_way(tmp_path):
    # Issue 29: `input_jsonl_fpath=...` over a YAML that says `input:` was refused as an unknown key.
    ours = tmp_path / "ours.yaml"
    ours.write_text("input: a.jsonl\noutput: out\nmodel: {name: m}\n")
    cfg = load_config(ours, ["input_jsonl_fpath=b.jsonl", "output_dir=o2"])
    assert (cfg.input, cfg.output) == ("b.jsonl", "o2")
    gym = tmp_path / "gym.yaml"
    gym.write_text("input_jsonl_fpath: a.jsonl\noutput_dir: out\nmodel: {name: m}\n")
    cfg = load_config(gym, ["input=b.jsonl"])
    assert (cfg.input, cfg.output) == ("b.jsonl", "out")
    assert load_config(gym, ["input_jsonl_fpath=c.jsonl"]).input == "c.jsonl"
    both = tmp_path / "both.yaml"
    both.write_text("input: a.jsonl\noutput: out\nmodel: {name: m}\ninput_jsonl_fpath: b.jsonl\n")
    with pytest.raises(ConfigError) as e:
        load_config(both)
    assert str(e.value) == (f"{both}:4: key 'input_jsonl_fpath' is given twice (first on line 1, as 'input'); "
                            "remove one")


def test_hydra_plus_overrides_are_accepted():
    # NeMo Gym's documented commands add keys the Hydra way: `+num_samples_in_parallel=30`.
    cfg = load_config(None, ["+input_jsonl_fpath=x.jsonl", "+output=o", "+model.name=m",
                             "+num_samples_in_parallel=30", "++num_repeats=2"])
    assert (cfg.input, cfg.model.name, cfg.num_samples_in_parallel, cfg.num_repeats) == ("x.jsonl", "m", 30, 2)
    with pytest.raises(ConfigError, match="empty key"):
        load_config(None, ["input=x", "output=o", "+=3"])


@pytest.mark.parametrize("override, message", [
    ("responses_create_params.temprature=0.5",
     "responses_create_params.temprature: unknown key (did you mean temperature?)"),
    ("num_sampels_in_parallel=3", "num_sampels_in_parallel: unknown key (did you mean num_samples_in_parallel?)"),
    ("verifier.type=regex verifier.pattern=a verifier.answer_feild=x",
     "verifier.answer_feild: unknown key for verifier type regex (did you mean answer_field?)"),
    ("model.base_ulr=http://h/v1", "model.base_ulr: unknown key for the openai backend (did you mean base_url?)"),
    ("verifier.type=composite verifier.components=[{type:%20regex,%20patern:%20a}]",
     "verifier.components.0.patern: unknown key for verifier type regex (did you mean pattern?)"),
    ("input_jsonl_fpth=x", "input_jsonl_fpth: unknown key (did you mean input_jsonl_fpath?)"),
    ("zzz=1", "zzz: unknown key\n"),
])
def test_an_unknown_key_names_the_nearest_known_one(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["input=x", "output=o", "model.name=m", *(o.replace("%20", " ") for o in override.split())])
    assert message in str(e.value) + "\n"
