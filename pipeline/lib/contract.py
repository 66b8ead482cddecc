"""The artifact contract: file names inside each step's artifact and its metadata keys.

Writers (steps, components) and readers (later steps, runners, summary, tests) use these
names, so a rename happens here once instead of in string literals on both sides.
"""

from __future__ import annotations

# --- raw_data (download_dataset) -----------------------------------------------------------
#: Metadata: where the data came from and the digest it was checked against.
META_SOURCE = "source"
META_SHA256 = "sha256"
#: Metadata: the fetched archive or folder, relative to the artifact folder.
META_PATH = "path"
#: Metadata: entries of a data folder left out of the copy (links, FIFOs), each a
#: ``{"path", "reason", "detail"}`` the data report lists among its skipped files.
META_SKIPPED = "skipped"

# --- prepared_data (preprocess_dataset) ----------------------------------------------------
CLASSES_FILE = "classes.json"
DATA_REPORT_JSON = "data_report.json"
DATA_REPORT_MD = "data_report.md"
#: Metadata: the preprocess parameters (so uncached later steps can log them), and counts.
META_PARAMS = "params"
META_DATA_COUNTS = ("class_counts", "split_sizes", "files_skipped", "duplicates_dropped")
#: Metadata: the first few skipped files as ``"<path> (<reason>)"``, for the console line.
META_SKIPPED_FILES = "skipped_files"

# --- trained_model (train_model) -----------------------------------------------------------
MODEL_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
HISTORY_FILE = "history.json"
TRAINING_SUMMARY_FILE = "training_summary.json"
PREVIEW_FILE = "augmentation_preview.png"
CHECKPOINT_DIR = "checkpoints"
#: Environment: a folder shared by runs for training checkpoints keyed by fingerprint (the
#: local runner sets it to ``<output_dir>/.checkpoints``; unset, they stay in the model).
CHECKPOINT_ROOT_ENV = "IRIS_CHECKPOINT_ROOT"
#: Its folder name under a local run's output folder.
LOCAL_CHECKPOINT_ROOT = ".checkpoints"
#: Metadata: MLflow identities of the training run and the logged model.
META_TRACKING_URI = "mlflow_tracking_uri"
META_RUN_ID = "mlflow_run_id"
META_EXPERIMENT_ID = "mlflow_experiment_id"
META_PARENT_RUN_ID = "mlflow_parent_run_id"
META_MODEL_URI = "mlflow_model_uri"
META_MODEL_ID = "mlflow_model_id"
#: Metadata: the digest of the data set input the model was trained on (links its metrics).
META_DATASET_DIGEST = "mlflow_dataset_digest"
#: Metadata and MLflow metrics: the exported model's scores on the validation split (with its
#: test-time views), ``model_val_<metric>``: what a sweep chooses its trial on.
VAL_SCORE_PREFIX = "model_val_"
#: With ``cv_folds``: the out-of-fold predictions over train + validation (a
#: :class:`pipeline.lib.stats.Predictions` CSV) and the cross-validation's figures
#: (``cv_<metric>`` with ``_ci_low``/``_ci_high``, per fold, epochs), also in the metadata.
OOF_PREDICTIONS_FILE = "oof_predictions.csv"
CROSS_VALIDATION_FILE = "cross_validation.json"
CV_SCORE_PREFIX = "cv_"
#: Metadata and MLflow metric: measured milliseconds per served image, test-time views included.
META_SERVING_MS = "serving_ms_per_image"
#: The training images' feature summary the drift check compares new images with
#: (``pipeline.lib.drift.Reference``); also an artifact of the logged MLflow model.
DRIFT_REFERENCE_FILE = "drift_reference.npz"
#: Metadata: the train step's settings (a sweep labels its trials by those that differ).
META_TRAIN_PARAMS = "train_params"

# --- selected_model (select_model, sweeps only): a copy of the chosen trial's trained_model
#: Metadata: the sweep's verdict (trials, their validation scores, the winner).
META_SWEEP = "sweep"

# --- evaluation / metrics / report (evaluate_model) ----------------------------------------
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
CONFUSION_PNG = "confusion_matrix.png"
CURVES_PNG = "training_curves.png"
MISCLASSIFIED_PNG = "misclassified.png"
#: Per test image: content sha256, true and predicted class, probabilities (paired comparisons).
PREDICTIONS_FILE = "predictions.csv"
#: Metrics metadata: the gate's metric name and verdict (also the task's ``Output``).
META_GATE_METRIC = "gate_metric"
META_GATE_PASSED = "gate_passed"
#: Metrics metadata: what the predictions were made on, and their MLflow copy.
META_DATA_SHA256 = "data_sha256"
META_SPLIT_DIGEST = "split_digest"
META_PREDICTIONS_URI = "predictions_uri"

# --- predictions / drift_report (predict_images, the batch-prediction pipeline) ---------
#: Per new image: file name, content sha256, label, one probability per class, model version.
BATCH_PREDICTIONS_FILE = "predictions.csv"
DRIFT_REPORT_JSON = "drift_report.json"
DRIFT_REPORT_MD = "drift_report.md"
#: Metadata: counts, the drift verdict, the model version and the MLflow run.
META_PREDICTED_COUNTS = "predicted_counts"
META_FILES_SKIPPED = "files_skipped"
META_DRIFT_VERDICT = "drift_verdict"
META_MODEL_VERSION = "model_version"

# --- task folders (kfp.local: <run folder>/[for-loop-N-iteration-I/]<task>/) ---------------
#: A kfp task that finished writes this into its task folder.
EXECUTOR_OUTPUT = "executor_output.json"
#: What every step leaves in its task folder (pipeline/lib/progress.py writes them, the local
#: runner reads them): its state, its result's key figures, its progress in a long loop.
STEP_STATUS_FILE = "step_status.json"
STEP_RESULT_FILE = "step_result.json"
STEP_PROGRESS_FILE = "step_progress.json"
#: ``state`` values of the status file, in the order a step passes through them.
STATE_STARTED, STATE_SUCCEEDED, STATE_FAILED = "started", "succeeded", "failed"
#: Environment: a token the local runner makes per run; its steps write it into their status,
#: which tells two runs sharing an output folder apart.
RUN_TOKEN_ENV = "IRIS_RUN_TOKEN"
