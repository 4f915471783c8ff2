"""Every page action as a method of one object: the handler groups put together.

Gradio calls these methods, the tests call them directly, without a browser. Each group lives
in its own module: the model and store (``ModelHandlers``), the steering settings
(``SettingHandlers``), the chat (``ChatHandlers``), the views of the model's inside
(``ViewHandlers``), sharing (``ShareHandlers``: links, downloads, numbers) and calibration
(``CalibrationHandlers``: the drift, the hold panel, the assistant axis). ``chat`` and
``retry`` take the page's settings as one ``ChatInputs``; ``personachat.app.endpoints`` gives
them the keyword parameters of the API.
"""

from __future__ import annotations

from personachat.app.calib_handlers import CalibrationHandlers
from personachat.app.chat_handlers import ChatHandlers
from personachat.app.model_handlers import ModelHandlers
from personachat.app.setting_handlers import SettingHandlers
from personachat.app.share_handlers import ShareHandlers
from personachat.app.view_handlers import ViewHandlers


class Handlers(
    ModelHandlers,
    SettingHandlers,
    ChatHandlers,
    ViewHandlers,
    ShareHandlers,
    CalibrationHandlers,
):
    """Every page action as a method; Gradio calls these, tests call them directly."""
