"""Lists the sound devices the pipelines can use, so MIC and CABLE can be set without guesswork.

    python list_devices.py                        # every device, then which microphone and cable would be used
    python list_devices.py --mic USB --cable 7    # check what a name or index picks before a call

For each device: index, host API, input/output channels, default sample rate, whether it opens as 16 kHz mono
(otherwise the pipelines open it at its own rate and resample), and whether it looks like a virtual cable.
Copy an index or part of a name into MIC / CABLE at the top of ml_denoiser_pipeline.py or
dsp_filter_pipeline.py, or pass it as --mic / --cable. On Linux the sound server's devices appear under their
server names (run ./start_pipeline.sh once to create the 'denoiser_cable' / 'Denoised microphone' pair).
Nothing to edit here.
"""
import argparse
import sys

import devices


def main(argv=None):
    parser = argparse.ArgumentParser(description="List sound devices for the denoiser pipelines.",
                                     allow_abbrev=False)
    parser.add_argument("--mic", default=None, help="show which input this index or name picks")
    parser.add_argument("--cable", default=None, help="show which output this index or name picks")
    args = parser.parse_args(argv)
    return devices.print_devices(devices.parse_device_spec(args.mic), devices.parse_device_spec(args.cable))


if __name__ == "__main__":
    sys.exit(main())
