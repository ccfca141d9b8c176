"""One APIRouter per area; ``app.http.app.create_app`` includes them all.

Routes stay thin: parse (pydantic), call the service in ``request.app.state.service``, encode.
A route added to any router is labelled in the metrics and guarded by the API key without
touching a list; only routes of ``health.router`` are open without a key.
"""
