"""perl.cli_exit: a command's process ends without the interpreter's last garbage collection, and
still runs what its end must run (atexit handlers, weakref finalizers such as a temporary
directory's removal, flushes of files closed by reference count)."""

import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_command_ends_with_the_heap_frozen_and_its_exit_work_done(tmp_path):
    script = textwrap.dedent(f"""
        import atexit, gc, sys, tempfile
        from perl.cli_exit import without_final_collection

        atexit.register(lambda: open({str(tmp_path / "atexit")!r}, "w").write("ran"))
        kept = tempfile.TemporaryDirectory(dir={str(tmp_path)!r})  # removed at exit by its finalizer
        open({str(tmp_path / "dir")!r}, "w").write(kept.name)
        freed = open({str(tmp_path / "freed")!r}, "w")  # buffered, never closed: flushed when freed
        freed.write("written")
        out = open({str(tmp_path / "out")!r}, "w")  # buffered, never closed, and also in a cycle
        out.write("written")
        cycle = [out]
        cycle.append(cycle)  # the file is also in a reference cycle, which the frozen heap keeps
        del cycle
        before = gc.get_freeze_count()
        code = without_final_collection(3)
        print(before, gc.get_freeze_count() > 1000)
        sys.exit(code)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.split() == ["0", "True"]  # nothing frozen before; the whole heap after
    assert (tmp_path / "atexit").read_text() == "ran"
    assert not os.path.exists((tmp_path / "dir").read_text())
    assert (tmp_path / "freed").read_text() == "written"  # freed by reference count at exit: flushed
    # a file left open in a cycle is not closed by the skipped collection: its buffered text is lost,
    # which is why a command calls this last, with its own files closed (the CLI writes through `with`)
    assert (tmp_path / "out").read_text() == ""


def test_the_perl_command_and_python_m_perl_verl_glue_end_through_it():
    (perl,) = [e for e in entry_points(group="console_scripts") if e.name == "perl"]
    assert perl.value == "perl.cli:console_main"
    main_py = open(os.path.join(ROOT, "perl", "verl_glue", "__main__.py")).read()
    assert "raise SystemExit(without_final_collection(main()))" in main_py
