# One image for every Tidemark process (API + sinks, stream worker, alert delivery, demo traffic).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY tidemark tidemark
COPY schemas schemas
COPY sinks sinks
COPY streams streams
COPY consumers consumers
COPY api api
RUN pip install --no-cache-dir .
ENV TIDEMARK_API_HOST=0.0.0.0
EXPOSE 8000
ENTRYPOINT ["tidemark"]
CMD ["serve"]
