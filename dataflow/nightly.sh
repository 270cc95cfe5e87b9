#!/usr/bin/env bash
# Nightly refresh: embeds INPUT into ${ROOT}/$(date -u +%F) on Dataflow, passing --previous = the
# latest earlier dated run under ROOT that finished (holds _SUCCESS.json), so only new or changed
# files are embedded and the rest of the rows are carried over.
#
# Meant for cron, or a Cloud Run job that Cloud Scheduler starts: a machine with this package
# installed (pip install ".[gcp]"; gcloud too for TEMPLATE mode) and credentials allowed to run
# Dataflow jobs and read/write the buckets. A crontab line (02:00 UTC every day):
#
#   0 2 * * * ROOT=gs://my-bucket/embeddings INPUT='gs://my-bucket/photos/**' PROJECT=my-project \
#     REGION=us-central1 IMAGE=us-central1-docker.pkg.dev/my-project/embed/embed-images:0.1.0 \
#     /opt/embed-images/dataflow/nightly.sh >> /var/log/embed-nightly.log 2>&1
#
# Environment; ROOT, INPUT, PROJECT and REGION are required:
#   ROOT            where the dated run directories live (gs://...)
#   INPUT           glob of the images, e.g. 'gs://my-bucket/photos/**'
#   PROJECT REGION  the Dataflow project and region (with the GPU quota)
#   TEMP_LOCATION   Dataflow temp/staging, default ${ROOT}/_tmp (not a dated name: never a --previous)
#   IMAGE           worker image built from ./Dockerfile; without it workers install this package
#                   from ./setup.py (--setup_file) at start-up, which is slower
#   TEMPLATE        gs:// spec of the Flex Template (see README, "Dataflow"): launch it with gcloud
#                   and return once the job is submitted, instead of launching from here and waiting
#   BACKBONES       default vgg16,inception_v3,resnet50
#   WEIGHTS         default imagenet (workers download from Keras; a gs:// directory keeps them offline)
#   ACCELERATOR     default 'type:nvidia-l4;count:1;machine_type:g2-standard-8;install-nvidia-driver'
#   EMBED_MIN_RAM   default 16GB
#   MACHINE_TYPE    workers of the other steps (listing, writing), default n2-standard-4
#   MAX_WORKERS     default 10
#   TODAY           the run's date, default $(date -u +%F); set it to re-run or backfill a day
#   DRY_RUN=1       build the job graph and run the launch checks, submit nothing
#   PYTHON          default python3
# Arguments are passed on to embed-images (TEMPLATE mode: to gcloud dataflow flex-template run).
#
# Exit status: 0 when the day's run finished (now or before), else embed-images' own (1: over the
# failure budget, 2: a bad option or launch check) or gcloud's. A day whose directory holds a
# partial run (no _SUCCESS.json: an attempt that failed or was killed) goes on from the rows it
# committed (--resume); with another model than those rows', or none committed, --overwrite
# starts it over, replacing only this tool's files;
# the job name embed-images-DAY keeps two launches of one day from running at once (Dataflow
# refuses a second active job of the same name in a region).
set -euo pipefail

: "${ROOT:?set ROOT, the directory of dated runs}" "${INPUT:?set INPUT, the glob of images}"
: "${PROJECT:?set PROJECT}" "${REGION:?set REGION}"
ROOT="${ROOT%/}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
TODAY="${TODAY:-$(date -u +%F)}"
OUTPUT="${ROOT}/${TODAY}"
TEMP_LOCATION="${TEMP_LOCATION:-${ROOT}/_tmp}"
BACKBONES="${BACKBONES:-vgg16,inception_v3,resnet50}"
WEIGHTS="${WEIGHTS:-imagenet}"
ACCELERATOR="${ACCELERATOR:-type:nvidia-l4;count:1;machine_type:g2-standard-8;install-nvidia-driver}"
EMBED_MIN_RAM="${EMBED_MIN_RAM:-16GB}"
MACHINE_TYPE="${MACHINE_TYPE:-n2-standard-4}"
MAX_WORKERS="${MAX_WORKERS:-10}"
JOB_NAME="embed-images-${TODAY}"

log() { echo "$(date -u +%FT%TZ) nightly: $*" >&2; }

status=0
PREVIOUS="$("$PYTHON" "$HERE/latest_run.py" "$ROOT" "$TODAY")" || status=$?
if [[ $status == 3 ]]; then
  log "${OUTPUT} already holds a finished run; nothing to do"
  exit 0
elif [[ $status != 0 ]]; then
  log "could not list ${ROOT} (exit status ${status})"
  exit "$status"
fi
if [[ -n "$PREVIOUS" ]]; then
  log "embedding ${INPUT} into ${OUTPUT}, reusing unchanged rows of ${PREVIOUS}"
else
  log "embedding ${INPUT} into ${OUTPUT}; no earlier finished run under ${ROOT}: embedding everything"
fi

if [[ -n "${TEMPLATE:-}" ]]; then
  # gcloud splits --parameters on commas; ^~^ makes "~" the separator (backbones hold commas).
  params="^~^input=${INPUT}~output=${OUTPUT}~backbones=${BACKBONES}~weights=${WEIGHTS}"
  params+="~accelerator=${ACCELERATOR}~embed_min_ram=${EMBED_MIN_RAM}~resume=true~overwrite=true"
  [[ -n "$PREVIOUS" ]] && params+="~previous=${PREVIOUS}"
  [[ -n "${IMAGE:-}" ]] && params+="~sdk_container_image=${IMAGE}"
  cmd=(gcloud dataflow flex-template run "$JOB_NAME" --project "$PROJECT" --region "$REGION"
       --template-file-gcs-location "$TEMPLATE" --temp-location "$TEMP_LOCATION"
       --worker-machine-type "$MACHINE_TYPE" --max-workers "$MAX_WORKERS"
       --additional-experiments no_use_multiple_sdk_containers
       --parameters "$params" "$@")
else
  cmd=("$PYTHON" -m pipeline
       --runner DataflowRunner --project "$PROJECT" --region "$REGION"
       --temp_location "$TEMP_LOCATION" --job_name "$JOB_NAME"
       --input "$INPUT" --output "$OUTPUT" --resume --overwrite
       --backbones "$BACKBONES" --weights "$WEIGHTS"
       --accelerator "$ACCELERATOR" --embed-min-ram "$EMBED_MIN_RAM"
       --machine_type "$MACHINE_TYPE" --max_num_workers "$MAX_WORKERS"
       --experiments=no_use_multiple_sdk_containers)
  [[ -n "$PREVIOUS" ]] && cmd+=(--previous "$PREVIOUS")
  if [[ -n "${IMAGE:-}" ]]; then
    cmd+=(--sdk_container_image "$IMAGE")
  else
    cmd+=(--setup_file "$HERE/../setup.py")
  fi
  [[ "${DRY_RUN:-}" == 1 ]] && cmd+=(--dry_run=True)
  cmd+=("$@")
fi

log "running: ${cmd[*]}"
if [[ -n "${TEMPLATE:-}" && "${DRY_RUN:-}" == 1 ]]; then
  log "DRY_RUN=1: not launching the template"
  exit 0
fi
exec "${cmd[@]}"
