"""How the engine's errors become HTTP answers (one handler per branch of the error tree)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from twin.api.limits import validation_error_handler
from twin.errors import AuthError, ConflictError, NotFoundError, RegistryError, SpecError, TwinError
from twin.policy import PermissionDenied


async def _spec_error(request: Request, exc: SpecError) -> JSONResponse:
    return JSONResponse(
        {"detail": str(exc), "problems": [str(p) for p in exc.problems], "hint": exc.hint},
        status_code=422,
    )


async def _conflict(request: Request, exc: ConflictError) -> JSONResponse:
    return JSONResponse({"detail": str(exc), "hint": exc.hint}, status_code=409)


async def _not_found(request: Request, exc: NotFoundError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=404)


async def _auth(request: Request, exc: AuthError) -> JSONResponse:
    return JSONResponse(
        {"detail": str(exc)}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
    )


async def _forbidden(request: Request, exc: PermissionDenied) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=403)


async def _twin(request: Request, exc: TwinError) -> JSONResponse:
    code = 409 if isinstance(exc, RegistryError) else 400
    return JSONResponse({"detail": str(exc), "hint": exc.hint}, status_code=code)


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, validation_error_handler)  # no input echo
    app.add_exception_handler(SpecError, _spec_error)  # type: ignore[arg-type]
    app.add_exception_handler(ConflictError, _conflict)  # type: ignore[arg-type]
    app.add_exception_handler(NotFoundError, _not_found)  # type: ignore[arg-type]
    app.add_exception_handler(AuthError, _auth)  # type: ignore[arg-type]
    app.add_exception_handler(PermissionDenied, _forbidden)  # type: ignore[arg-type]
    app.add_exception_handler(TwinError, _twin)  # type: ignore[arg-type]
