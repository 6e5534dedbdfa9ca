"""Triton python-backend model that runs the version folder's `model.onnx` with onnxruntime on CPU.

Copied verbatim as `<model>/<version>/model.py` by the export step and served with `configs/cpu.pbtxt`
(`tritonserver --model-config-name=cpu`). The production config (`config.pbtxt`) serves the same
`model.onnx` with Triton's onnxruntime backend on GPU, so CPU and GPU answer from one artifact.

Runs inside Triton's python-backend stub: it may import only numpy, onnxruntime and
triton_python_backend_utils, never Vitrine itself.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = ort.SessionOptions()
        # Triton runs model instances side by side; each instance keeps to its own thread budget.
        options.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        self.input_names = [entry["name"] for entry in config["input"]]
        self.output_names = [entry["name"] for entry in config["output"]]
        self.output_dtypes = {
            entry["name"]: pb_utils.triton_string_to_numpy(entry["data_type"]) for entry in config["output"]
        }
        onnx_inputs = {i.name for i in self.session.get_inputs()}
        onnx_outputs = {o.name for o in self.session.get_outputs()}
        missing = [n for n in self.input_names if n not in onnx_inputs] + [
            n for n in self.output_names if n not in onnx_outputs
        ]
        if missing or len(onnx_inputs) != len(self.input_names):
            raise pb_utils.TritonModelException(
                f"config and {path} disagree: config inputs {self.input_names}, outputs {self.output_names}; "
                f"ONNX inputs {sorted(onnx_inputs)}, outputs {sorted(onnx_outputs)}"
            )

    def execute(self, requests):
        """One onnxruntime run for the whole dynamic batch when shapes allow, else one run per request."""
        try:
            feeds = [
                {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.input_names}
                for request in requests
            ]
        except Exception as exc:  # a malformed request must fail alone, not take the batch down
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"bad input: {exc}")) for _ in requests]
        sizes = [feed[self.input_names[0]].shape[0] for feed in feeds]
        # Only the outputs some request asked for (none named: all), e.g. explain_steps only when wanted.
        wanted = [self._requested(request) for request in requests]
        names = [n for n in self.output_names if any(n in w for w in wanted)]
        try:
            merged = {name: np.concatenate([feed[name] for feed in feeds]) for name in self.input_names}
        except ValueError:
            return [self._run_one(feed, [n for n in self.output_names if n in w]) for feed, w in zip(feeds, wanted)]
        try:
            outputs = self.session.run(names, merged)
        except Exception as exc:
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))) for _ in requests]
        responses, start = [], 0
        for size, asked in zip(sizes, wanted):
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(out[start : start + size], dtype=self.output_dtypes[name]))
                for name, out in zip(names, outputs)
                if name in asked
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def _requested(self, request):
        names = set(request.requested_output_names())
        return names & set(self.output_names) or set(self.output_names)

    def _run_one(self, feed, names):
        try:
            outputs = self.session.run(names, feed)
        except Exception as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor(name, np.asarray(out, dtype=self.output_dtypes[name]))
                for name, out in zip(names, outputs)
            ]
        )

    def finalize(self):
        self.session = None
