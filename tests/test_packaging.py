"""The source-root layout: ssl/ must never become a package that shadows Python's ssl."""

import subprocess
import sys

import pytest
from helpers import REPO, script_env


def test_ssl_dir_is_not_a_package():
    assert not (REPO / "ssl" / "__init__.py").exists()
    assert (REPO / "ssl" / "selfsup" / "__init__.py").is_file()


@pytest.mark.e2e
def test_stdlib_ssl_still_works_after_import_selfsup():
    # A fresh interpreter started from the repository root, where a stray ssl package would shadow.
    code = (
        "import selfsup, ssl, torch\n"
        "assert ssl.__file__.startswith(__import__('sysconfig').get_paths()['stdlib']), ssl.__file__\n"
        "ctx = ssl.create_default_context()\n"
        "assert ctx.verify_mode == ssl.CERT_REQUIRED\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=script_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
