"""The documentation site (mkdocs.yml, docs/) builds with warnings as errors: a broken link, a missing page or an API
name that no longer exists fails the build. Its Python blocks run in tests/test_docs.py."""
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


def test_site_builds_with_warnings_as_errors(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    api = (site / "api" / "index.html").read_text()
    # mkdocstrings rendered the public API from the docstrings: explain's own first line is there.
    from pytorch_grad_cam_vlm import explain
    first_words = " ".join(explain.__doc__.split()[:3])
    assert first_words.replace("``", "") in api.replace("<code>", "").replace("</code>", "")
    for page in ("trust", "families", "methods", "cli"):
        assert (site / page / "index.html").exists(), page
