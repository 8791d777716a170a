"""The client of a MedPLIB server, and the one `Prediction` type every path returns (`medplib predict`, the HTTP
API, batch evaluation). No torch, no Ray: numpy, Pillow and httpx. Installed by `pip install ./client`
(`medplib-client`) and, as part of the main distribution, by `pip install .`."""

from medplib_client.client import MedPLIBAPIError, MedPLIBClient, ask_server, decode_mask
from medplib_client.prediction import Prediction, VolumePrediction

# Released together with `medplib` (medplib.__version__); tests/test_packaging.py checks that the two agree.
__version__ = "0.1.0"

__all__ = ["MedPLIBAPIError", "MedPLIBClient", "Prediction", "VolumePrediction", "ask_server", "decode_mask"]
