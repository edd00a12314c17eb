"""`ddpmkit serve`: the web page, a face like the CLI. Its parts, one idea each:

    limits.py   what one request may ask for (steps, images, prompt length, uploads)
    shelf.py    the runs a page serves, loaded once
    actions.py  what each button does: plain functions over the library (no gradio)
    app.py      the gradio layout and its events
    server.py   make_page / serve: the queued app on a loopback port

Needs the web extra: pip install "ddpmkit[web]".
"""
