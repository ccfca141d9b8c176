#!/bin/sh
# One-shot (compose service `fit`): make sure the projection artifact exists in the data volume.
#   1. $RDSERVE_ARTIFACT exists        -> nothing to do (exit 0; delete the file to refit);
#   2. $RDSERVE_REFERENCE_SCALERS set  -> rdserve import-reference DIR (the reference scalers);
#   3. otherwise                       -> rdserve fit on $RDSERVE_FIT_FASTA or the packaged sample.
# Chain: $RDSERVE_FAMILY / $RDSERVE_MODELS (+ $RDSERVE_REVISION). Without $RDSERVE_ARTIFACT the
# path is the one `rdserve serve` uses by default: <data_dir>/artifacts/<family>-<levels>.safetensors.
set -eu

# Compose passes an optional setting it has no value for as an empty string: make it unset.
if [ -z "${RDSERVE_REVISION:-}" ]; then unset RDSERVE_REVISION; fi

family="${RDSERVE_FAMILY:-esm2}"
if [ -z "${RDSERVE_MODELS:-}" ]; then unset RDSERVE_MODELS; fi
models="${RDSERVE_MODELS:-$(python -c 'from app.settings import Settings
print(",".join(Settings().default_chain))')}"
artifact="${RDSERVE_ARTIFACT:-}"
if [ -z "$artifact" ]; then
    artifact="$(python -c 'from app.bootstrap import default_artifact_path
from app.settings import Settings
print(default_artifact_path(Settings()))')"
fi

if [ -e "$artifact" ]; then
    echo "fit: $artifact exists; nothing to do (delete it to refit or re-import)"
    exit 0
fi
mkdir -p "$(dirname "$artifact")"

if [ -n "${RDSERVE_REFERENCE_SCALERS:-}" ]; then
    echo "fit: importing reference scalers from $RDSERVE_REFERENCE_SCALERS into $artifact"
    set -- import-reference "$RDSERVE_REFERENCE_SCALERS" --family "$family" --models "$models"
    if [ -n "${RDSERVE_REFERENCE_REGRESSOR:-}" ]; then
        set -- "$@" --regressor "$RDSERVE_REFERENCE_REGRESSOR"
    fi
    if [ -n "${RDSERVE_REFERENCE_NSEQS:-}" ]; then
        set -- "$@" --nseqs "$RDSERVE_REFERENCE_NSEQS"
    fi
else
    echo "fit: fitting $family $models into $artifact"
    set -- fit --family "$family" --models "$models" \
        --max-seqs "${RDSERVE_FIT_SEQUENCES:-1000}" \
        --device "${RDSERVE_DEVICE:-auto}" --dtype "${RDSERVE_DTYPE:-auto}" \
        --token-budget "${RDSERVE_TOKEN_BUDGET:-8192}"
    if [ -n "${RDSERVE_FIT_FASTA:-}" ]; then
        set -- "$@" --fasta "$RDSERVE_FIT_FASTA"
    fi
    if [ -n "${RDSERVE_REVISION:-}" ]; then
        set -- "$@" --revision "$RDSERVE_REVISION"
    fi
fi
exec rdserve "$@" --out "$artifact"
