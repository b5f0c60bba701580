"""Render a recorded terminal transcript (docs/assets/synthia-cli.txt) as the README's SVG.

The transcript is a real session captured with ``tmux capture-pane`` (a 100-column pane,
HOME=/home/you): ``synthia variants``, then ``synthia chat --demo --max-tokens 16 --no-log
--seed 3``, one question, ``/tot on``, ``/exit``. Only colour is added here.
Run: ``python docs/assets/render_svg.py`` (needs rich).
"""

from pathlib import Path

from rich.console import Console
from rich.text import Text

HERE = Path(__file__).parent
STYLES = {"$ ": "bold green", "You: ": "bold cyan", "Synthia: ": "bold magenta", "[": "dim"}

console = Console(record=True, width=100, file=open("/dev/null", "w"), force_terminal=True)  # noqa: SIM115
for line in (HERE / "synthia-cli.txt").read_text().rstrip().splitlines():
    style = next((s for prefix, s in STYLES.items() if line.startswith(prefix)), "")
    console.print(Text(line, style=style))
console.save_svg(str(HERE / "synthia-cli.svg"), title="synthia variants; synthia chat --demo")
