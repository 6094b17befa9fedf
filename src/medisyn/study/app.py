"""The reader study web app (Flask, served by ``medisyn study serve``).

Pages (no JavaScript, no external assets: it works offline and with the keyboard alone):

* ``GET  /read/<token>``             the reader's next unanswered image (so a reader who pauses, closes
                                     the tab or reloads resumes where they left off), or "all done";
* ``POST /read/<token>/answer``      one answer (class + 1-5 confidence), stored at once, then 303 to
                                     the next image; a second submit of the same image stores nothing;
* ``GET  /read/<token>/image/<id>``  a blinded image of the reader's own study;
* ``GET  /read/<token>/pause``       "your answers are saved";
* ``GET  /admin/<token>``            progress per reader (counts only; never answers);
* ``GET  /healthz``                  liveness.

The token in the path is the only credential: a reader's token reaches that reader's study and
answers and nothing else (another reader's answers are never shown to anyone through the app).
Tokens in paths do not leak through Referer (``Referrer-Policy: no-referrer``, no external links).

Every response carries the same headers whatever it shows (no ETag, no Last-Modified, no file
name, ``Cache-Control: no-store``); an image response differs from another only in its body
(and all bodies have one length: :func:`medisyn.study.create.blind_png`).
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, abort, redirect, render_template_string, request
from sqlalchemy import Engine
from werkzeug.exceptions import HTTPException

from medisyn.study import db

log = logging.getLogger("medisyn.study.app")

SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Content-Security-Policy": ("default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; "
                                "frame-ancestors 'none'; base-uri 'none'"),
}

# High contrast (#111 on #fff is 18.9:1; white on #0b4fa8 is 7.8:1: WCAG AAA), a thick focus ring, large hit areas;
# the image and the form sit side by side on a laptop screen (1366 x 768) and stack on narrow ones.
STYLE = """
*{box-sizing:border-box}
body{margin:0;font:17px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;color:#111;background:#fff}
header{padding:.5rem 1.25rem;border-bottom:1px solid #767676;display:flex;justify-content:space-between;
 align-items:center;gap:1rem;flex-wrap:wrap}
header p{margin:0}
main{padding:1rem 1.25rem;max-width:1280px;margin:0 auto}
h1{font-size:1.3rem;margin:.2rem 0 .8rem}
.reading{display:flex;gap:1.5rem;align-items:flex-start;flex-wrap:wrap}
.reading figure{margin:0;flex:0 1 min(72vh,620px);min-width:240px}
.reading img{display:block;width:100%;height:auto;aspect-ratio:1/1;border:1px solid #767676;background:#000}
form{flex:1 1 320px;min-width:280px}
fieldset{border:1px solid #767676;border-radius:6px;margin:0 0 1rem;padding:.5rem .9rem .8rem}
legend{font-weight:600;padding:0 .3rem}
.choice{display:flex;align-items:center;gap:.6rem;padding:.3rem .2rem;border-radius:4px}
.choice input{width:1.25rem;height:1.25rem;margin:0;accent-color:#0b4fa8}
.choice label{flex:1;cursor:pointer}
.scale{display:flex;gap:.4rem;flex-wrap:wrap}
.scale .choice{flex:0 0 auto;border:1px solid #767676;padding:.35rem .7rem}
.hint{font-size:.92rem;color:#333;margin:.2rem 0 .6rem}
button,.button{font:inherit;font-weight:600;background:#0b4fa8;color:#fff;border:2px solid #0b4fa8;
 border-radius:6px;padding:.6rem 1.1rem;cursor:pointer;text-decoration:none;display:inline-block}
a{color:#0b4fa8}
:focus-visible{outline:3px solid #c2410c;outline-offset:2px}
input:focus-visible{outline:3px solid #c2410c;outline-offset:2px}
progress{width:14rem;height:1rem;accent-color:#0b4fa8}
table{border-collapse:collapse;margin:.5rem 0}
th,td{border:1px solid #767676;padding:.35rem .7rem;text-align:left}
.notice{border-left:5px solid #0b4fa8;padding:.4rem .9rem;background:#f1f5fb}
.error{border-left:5px solid #b91c1c;padding:.4rem .9rem;background:#fdf2f2}
.skip{position:absolute;left:-999px}
.skip:focus{left:1rem;top:.5rem;background:#fff;padding:.3rem}
"""

BASE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{{ title }}</title>
<link rel="stylesheet" href="/assets/study.css">
</head>
<body>
<a class="skip" href="#main">Skip to content</a>
<header><p><strong>MediSyn reader study</strong></p>{% block status %}{% endblock %}</header>
<main id="main">
{% block body %}{% endblock %}
</main>
</body>
</html>
"""

READ = BASE.replace("{% block status %}{% endblock %}", """<p>
<label for="progress">Progress: {{ nxt.answered }} of {{ nxt.total }} answered</label>
<progress id="progress" max="{{ nxt.total }}" value="{{ nxt.answered }}">{{ nxt.answered }}/{{ nxt.total }}</progress>
</p>""").replace("{% block body %}{% endblock %}", """
<h1>Image {{ nxt.position }} of {{ nxt.total }}</h1>
<div class="reading">
<figure>
<img src="/read/{{ token }}/image/{{ nxt.item_id }}" width="{{ size }}" height="{{ size }}"
 alt="Study image {{ nxt.position }} of {{ nxt.total }}">
</figure>
<form method="post" action="/read/{{ token }}/answer">
<input type="hidden" name="item" value="{{ nxt.item_id }}">
<fieldset>
<legend>{{ question }}</legend>
<p class="hint" id="class-hint">Arrow keys move between choices.</p>
{% for c in classes %}
<div class="choice"><input type="radio" name="label" id="label-{{ loop.index }}" value="{{ c }}" required
 aria-describedby="class-hint"{% if loop.first %} autofocus{% endif %}>
<label for="label-{{ loop.index }}">{{ c }}</label></div>
{% endfor %}
</fieldset>
<fieldset>
<legend>How confident are you? (1 = not at all, 5 = very)</legend>
<div class="scale">
{% for level in levels %}
<div class="choice"><input type="radio" name="confidence" id="confidence-{{ level }}" value="{{ level }}" required>
<label for="confidence-{{ level }}">{{ level }}</label></div>
{% endfor %}
</div>
</fieldset>
<button type="submit">Save answer and show the next image</button>
</form>
</div>
<p><a href="/read/{{ token }}/pause">Pause: my answers are saved, I will come back later</a></p>
""")

MESSAGE = BASE.replace("{% block body %}{% endblock %}", """
<h1>{{ title }}</h1>
<p class="{{ kind }}" role="{{ 'alert' if kind == 'error' else 'status' }}">{{ message }}</p>
{% if link %}<p><a class="button" href="{{ link }}">{{ link_text }}</a></p>{% endif %}
""")

ADMIN = BASE.replace("{% block body %}{% endblock %}", """
<h1>{{ study.name }}</h1>
<p>Study <code>{{ study.id }}</code>, task {{ study.task }}, {{ total }} images:
{{ 'closed ' ~ study.closed_at.strftime('%Y-%m-%d %H:%M UTC') if study.closed_at else 'open' }}.
Answers are not shown here; the report (<code>medisyn study report</code>) reads them once the study is closed.</p>
<table>
<caption class="skip">Progress per reader</caption>
<thead><tr><th scope="col">Reader</th><th scope="col">Answered</th><th scope="col">Last answer (UTC)</th></tr></thead>
<tbody>
{% for r in readers %}
<tr><th scope="row">{{ r.name }}</th><td>{{ r.answered }} / {{ r.total }}</td>
<td>{{ r.last_answer_at.strftime('%Y-%m-%d %H:%M') if r.last_answer_at else '-' }}</td></tr>
{% else %}
<tr><td colspan="3">No readers yet: <code>medisyn study add-reader</code></td></tr>
{% endfor %}
</tbody>
</table>
""")


def create_app(db_url: str | None = None, engine: Engine | None = None) -> Flask:
    """The WSGI app over the study database at ``db_url`` (migrated on open)."""
    engine = engine or db.open_db(db_url)
    app = Flask("medisyn.study", static_folder=None)
    app.config.update(MAX_CONTENT_LENGTH=16 * 1024, SESSION_COOKIE_HTTPONLY=True)

    def message(title: str, text: str, status: int = 200, kind: str = "notice", link: str = "",
                link_text: str = "") -> Response:
        html = render_template_string(MESSAGE, title=title, message=text, kind=kind, link=link, link_text=link_text)
        return Response(html, status=status, mimetype="text/html")

    @app.after_request
    def same_headers(resp: Response) -> Response:
        # Identical headers on every response: nothing about an image's origin, age or name.
        for key in ("ETag", "Last-Modified", "Content-Disposition", "Expires", "Set-Cookie"):
            resp.headers.pop(key, None)
        resp.headers.update(SECURITY_HEADERS)
        return resp

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        return message(f"{exc.code} {exc.name}", exc.description or "", status=exc.code or 500, kind="error")

    @app.get("/healthz")
    def healthz() -> Response:
        return Response("ok\n", mimetype="text/plain")

    @app.get("/assets/study.css")
    def stylesheet() -> Response:
        return Response(STYLE, mimetype="text/css")

    @app.get("/")
    def index() -> Response:
        return message("MediSyn reader study", "Open the personal link you were given to start or continue.")

    @app.get("/read/<token>")
    def read(token: str) -> Response:
        with db.session(engine) as s:
            reader = db.reader_for_token(s, token)
            if reader is None:
                abort(404, "This link is not valid. Check it against the one you were given.")
            study = db.get_study(s, reader.study_id)
            nxt = db.next_item(s, reader)
            classes, question, closed = study.classes, study.question, study.closed
            size = _image_side(s, reader, nxt.item_id)
        if nxt.item_id is None:
            return message("Thank you", f"You have answered all {nxt.total} images. You can close this page.")
        if closed:
            return message("Study closed", "This study is closed; no more answers are taken. Thank you.")
        html = render_template_string(READ, title=f"Image {nxt.position} of {nxt.total}", nxt=nxt, token=token,
                                      classes=classes, question=question, levels=db.CONFIDENCE_LEVELS, size=size)
        return Response(html, mimetype="text/html")

    @app.post("/read/<token>/answer")
    def answer(token: str) -> Any:
        item = request.form.get("item", "")
        label = request.form.get("label", "")
        try:
            confidence = int(request.form.get("confidence", ""))
        except ValueError:
            confidence = 0
        if not label or confidence == 0:
            return message("Answer incomplete", "Choose a class and a confidence from 1 to 5.", status=400,
                           kind="error", link=f"/read/{token}", link_text="Back to the image")
        try:
            stored = db.record_answer(engine, token, item, label, confidence)
        except db.StudyError as exc:
            status = 404 if "token" in str(exc) else 409 if "closed" in str(exc) else 400
            return message("Answer not saved", str(exc), status=status, kind="error",
                           link=f"/read/{token}" if status != 404 else "", link_text="Back to the study")
        if not stored:
            log.info("duplicate answer ignored (the first answer stands)")
        return redirect(f"/read/{token}", code=303)  # POST/redirect/GET: a reload never resubmits

    @app.get("/read/<token>/image/<item_id>")
    def image(token: str, item_id: str) -> Response:
        with db.session(engine) as s:
            reader = db.reader_for_token(s, token)
            png = db.item_png(s, reader, item_id) if reader is not None else None
        if png is None:
            abort(404, "No such image.")
        return Response(png, mimetype="image/png")

    @app.get("/read/<token>/pause")
    def pause(token: str) -> Response:
        with db.session(engine) as s:
            reader = db.reader_for_token(s, token)
            if reader is None:
                abort(404, "This link is not valid. Check it against the one you were given.")
            nxt = db.next_item(s, reader)
        return message("Paused", f"Your {nxt.answered} answers are saved. Open your link again to continue "
                       f"with image {nxt.position} of {nxt.total}.", link=f"/read/{token}", link_text="Continue now")

    @app.get("/admin/<token>")
    def admin(token: str) -> Response:
        with db.session(engine) as s:
            study = db.study_for_admin_token(s, token)
            if study is None:
                abort(404, "This link is not valid.")
            readers = db.progress(s, study.id)
            total = _count_items(s, study.id)
            html = render_template_string(ADMIN, title=f"Progress: {study.name}", study=study, readers=readers,
                                          total=total)
        return Response(html, mimetype="text/html")

    return app


def _count_items(s, study_id: str) -> int:
    from sqlalchemy import func, select

    return int(s.scalar(select(func.count()).select_from(db.StudyItem).where(db.StudyItem.study_id == study_id)) or 0)


def _image_side(s, reader: db.Reader, item_id: str | None) -> int:
    """The served side in pixels (every image of a study has the same one), for the img width/height."""
    import json

    study = db.get_study(s, reader.study_id)
    return int(json.loads(study.definition_json).get("image_size", 512))


def serve(db_url: str | None = None, host: str = "127.0.0.1", port: int = 8080, threads: bool = True) -> None:
    """Serve the app with werkzeug's threaded WSGI server until SIGTERM / Ctrl-C."""
    import signal

    from werkzeug.serving import make_server

    app = create_app(db_url)
    server = make_server(host, port, app, threaded=threads)

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    log.info("reader study on http://%s:%d (database %s)", host, server.server_port,
             db.redact(db.resolve_db_url(db_url)))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        db.dispose_all()
