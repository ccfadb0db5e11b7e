from tests.conftest import run_ffn, write_jpeg


def test_verify_lists_every_bad_file_with_its_line(tmp_path):
    write_jpeg(tmp_path / "ok" / "a.jpg")
    write_jpeg(tmp_path / "ok" / "b.jpg", size=(64, 48))
    truncated = write_jpeg(tmp_path / "bad" / "truncated.jpg", size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:200])
    (tmp_path / "bad" / "text.jpg").write_text("not an image")
    (tmp_path / "bad" / "empty.jpg").write_bytes(b"")
    split = tmp_path / "split.txt"
    split.write_text(
        "ok/a.jpg 0\nbad/truncated.jpg 0\nok/b.jpg 1\nbad/missing.jpg 1\nbad/text.jpg 0\nbad/empty.jpg 1\n"
    )
    result = run_ffn("splits", "verify", split, "--root", tmp_path, "--workers", "2")
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "2 of 6 images decode; 4 bad"
    reported = {line.split(" ")[0]: line for line in lines[:-1]}
    assert set(reported) == {f"{split}:{n}" for n in (2, 4, 5, 6)}
    assert "missing" in reported[f"{split}:4"]
    assert "unreadable" in reported[f"{split}:2"] and "unreadable" in reported[f"{split}:5"]


def test_verify_clean_split_exits_zero(demo_root):
    result = run_ffn("splits", "verify", demo_root / "test.txt", "--root", demo_root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("300 of 300 images decode; 0 bad")
