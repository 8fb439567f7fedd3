"Helpers shared by the command's tests"
import json
import pytest
from ranger_fastai.cli import main

def results(out): return json.loads((out/'results.json').read_text())

@pytest.fixture
def fails(capsys):
    "`fails(argv)` runs `main(argv)`: it must exit with status 2 and one line on stderr, without a traceback; the line"
    def run(argv):
        with pytest.raises(SystemExit) as e: main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2, err
        assert 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
        return err.strip()
    return run
