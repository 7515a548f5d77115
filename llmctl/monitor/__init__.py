"""Reading a run from the outside: status rows, the live dashboard and PNG plots.

Everything here works from the registry and `runs/<run>/events.jsonl` alone, and never imports
torch or the training stack, so it starts fast on a laptop with a log copied from a GPU box.

    runs.py         finding runs and their logs (by name, directory or copied file)
    series.py       a curve kept at bounded size however long the run
    state.py        events folded into a run's state: figures, history, alerts, liveness
    chart.py        a braille line chart for the terminal
    render.py       the dashboard frame
    live.py         the full-screen loop and its keys
    status.py       the workspace and its runs as JSON-ready documents
    status_view.py  those documents as tables and a lineage tree
    plot.py         curves of several runs as a PNG (matplotlib)
    units.py        figures as people read them
"""
