"""The chat and the web demo: one conversation with the project's models (demo/chat.py), served at a
terminal (scripts/chat.py) or as a web page (demo/web.py, scripts/web_demo.py)."""
