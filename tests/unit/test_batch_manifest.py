"""A batch's manifest (serve_app/batch/manifest.py): JSONL, CSV and globs read as a user writes
them, and every line that cannot run refused before anything runs, in one line naming it."""

import pytest

from serve_app.batch.manifest import load
from serve_app.errors import InvalidBatch


def write(path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_jsonl_inputs_are_read_from_the_manifests_folder_and_named_by_their_stem(tmp_path, monkeypatch):
    manifest = write(tmp_path / "lists" / "m.jsonl", "\n".join([
        '# a comment, then a blank line',
        '',
        '{"input": "../clips/a.mp4", "config": {"prompt": "fish"}}',
        '{"input": "/abs/b.mov", "config": {"prompt": "cat", "mode": "overlay"}, "output": "cats/b"}',
        '{"input": "s3://bucket/c.mp4", "config": {"alpha": 0.3}}',
    ]))
    monkeypatch.chdir("/")  # the working directory does not matter
    items = load(manifest, {"prompt": "default", "outputs": ["video", "objects"]})
    assert [(i.index, i.input, i.output) for i in items] == [
        (0, str(tmp_path / "clips" / "a.mp4"), "a"),
        (1, "/abs/b.mov", "cats/b"), (2, "s3://bucket/c.mp4", "c")]
    assert (items[0].config.prompt, items[1].config.mode, items[2].config.prompt) == ("fish", "overlay", "default")
    assert items[2].config.alpha == 0.3 and items[0].config.outputs == ["video", "objects"]  # the line's config wins
    assert items[1].where == "m.jsonl line 4"


def test_csv_columns_are_config_fields_with_their_types(tmp_path):
    manifest = write(tmp_path / "m.csv", "input,prompt,mode,alpha,max_objects,outputs,output\n"
                                         "a.mp4,red fish,overlay,0.25,3,video;objects,\n"
                                         'b.mp4,"blue, green",,,,,bee\n')
    a, b = load(manifest, {})
    assert (a.output, a.config.prompt, a.config.mode, a.config.alpha, a.config.max_objects) == \
        ("a", "red fish", "overlay", 0.25, 3)
    assert a.config.outputs == ["video", "objects"] and a.input == str(tmp_path / "a.mp4")
    assert (b.output, b.config.prompt, b.config.mode, b.config.alpha) == ("bee", "blue, green", "mask", 0.5)


def test_a_glob_names_outputs_by_their_path_below_its_fixed_folder(tmp_path):
    for name in ("cam1/x.mp4", "cam2/x.mp4", "cam2/y.MP4", "notes.txt"):
        write(tmp_path / "in" / name, "")
    items = load(str(tmp_path / "in" / "**" / "*.mp4"), {"prompt": "red"})
    assert [(i.output, i.input) for i in items] == [("cam1/x", str(tmp_path / "in/cam1/x.mp4")),
                                                    ("cam2/x", str(tmp_path / "in/cam2/x.mp4"))]
    with pytest.raises(InvalidBatch, match="give --prompt"):
        load(str(tmp_path / "in" / "*" / "*.mp4"), {})
    with pytest.raises(InvalidBatch, match="matches no files"):
        load(str(tmp_path / "in" / "*.webm"), {"prompt": "red"})


@pytest.mark.parametrize("lines, words", [
    (['{"input": "a.mp4", "config": {"prompt": "x"}}', '{"input": "b.mp4", '], "m.jsonl line 2 is not JSON"),
    (['["a.mp4"]'], "m.jsonl line 1 is list; each line is an object"),
    (['{"input": "a.mp4", "confg": {"prompt": "x"}}'], "m.jsonl line 1: 'confg' is not a known key"),
    (['{"input": "a.mp4", "config": {"prompt": "x", "alpha": 2}}'],
     "m.jsonl line 1: config.alpha is 2; it must be between 0.0 and 1.0"),
    (['{"config": {"prompt": "x"}}'], "m.jsonl line 1: input is missing"),
    (['{"input": "a.mp4", "config": {"prompt": "x"}, "output": "../up"}'], "output '../up' must be a relative name"),
    (['{"input": "a.mp4", "config": {"prompt": "x"}, "output": ".hidden"}'], "output '.hidden' must be"),
    (['{"input": "a.mp4", "config": {"prompt": "x"}}', '{"input": "other/a.mov", "config": {"prompt": "y"}}'],
     "m.jsonl line 2 and m.jsonl line 1 both write 'a'; give one an 'output' name"),
    (["", "# nothing"], "names no inputs"),
])
def test_a_manifest_that_cannot_run_is_refused_naming_its_line(tmp_path, lines, words):
    with pytest.raises(InvalidBatch) as refused:
        load(write(tmp_path / "m.jsonl", "\n".join(lines)), {})
    assert words in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("text, words", [
    ("video,prompt\na.mp4,x\n", "m.csv has no 'input' column"),
    ("input,promt\na.mp4,x\n", "column 'promt' is neither 'input', 'output' nor a config field"),
    ("input,prompt,alpha\na.mp4,x,half\n", "m.csv line 2: alpha is 'half'"),
    ("input,prompt\na.mp4,x,extra\n", "m.csv line 2 has more cells than the header"),
])
def test_a_csv_that_cannot_run_is_refused_naming_its_line_or_column(tmp_path, text, words):
    with pytest.raises(InvalidBatch, match=words):
        load(write(tmp_path / "m.csv", text), {})


def test_a_manifest_of_another_kind_or_missing_is_one_line(tmp_path):
    with pytest.raises(InvalidBatch, match="neither a .jsonl or .csv file nor a glob"):
        load(write(tmp_path / "m.txt", "a.mp4\n"), {"prompt": "x"})
    with pytest.raises(InvalidBatch, match="cannot be read: No such file"):
        load(str(tmp_path / "gone.jsonl"), {})
