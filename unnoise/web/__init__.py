"""A local web page for any run: choose a sampler and its options, watch the denoising, download.

``unnoise.web.app.serve(run_dir, host="127.0.0.1", port=7860)`` serves it; ``create_app(run_dir)``
is the Starlette app (for tests, or another ASGI server). Optional: ``pip install 'unnoise[web]'``.
"""
